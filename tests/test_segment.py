"""The lung segmenter: mask pairs in both layouts, the U-Net, the segment step end to end."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrexp.data.mask_pairs import find_mask_pairs, source_of
from cxrexp.errors import DatasetError
from cxrexp.promotion import segmenter_champion

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared" / "data"


def _png(path: Path, array: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


@pytest.mark.parametrize(
    "name, folder, expected",
    [("MCUCXR_0001_0.png", "lung-seg-nlm", "montgomery"), ("CHNCXR_0002_1.png", "x", "shenzhen"),
     ("Viral Pneumonia-1.png", "Viral Pneumonia", "Viral Pneumonia")],
)
def test_source_of(name, folder, expected):
    assert source_of(name, folder) == expected


def test_pairs_in_both_layouts_list_what_is_unpaired(tmp_path):
    grey = np.full((40, 40), 100, np.uint8)
    kaggle = tmp_path / "kaggle"
    _png(kaggle / "COVID" / "images" / "a.png", grey)
    _png(kaggle / "COVID" / "masks" / "a.png", grey)
    _png(kaggle / "COVID" / "images" / "no-mask.png", grey)
    _png(kaggle / "COVID" / "masks" / "no-image.png", grey)
    _png(kaggle / "Normal" / "images" / "b.png", grey)  # a class without masks/
    pair = tmp_path / "nlm"
    _png(pair / "images" / "MCUCXR_0001_0.png", grey)
    _png(pair / "masks" / "MCUCXR_0001_0.png", grey)
    _png(pair / "images" / "CHNCXR_0001_1.png", grey)
    _png(pair / "masks" / "CHNCXR_0001_1.png", grey)
    found = find_mask_pairs([str(kaggle), str(pair)], exclude=("*_1.png",))
    assert [(Path(p.image).name, p.source) for p in found.pairs] == [("a.png", "COVID"), ("MCUCXR_0001_0.png", "montgomery")]
    reasons = {Path(path).name: reason for path, reason in found.unpaired}
    assert reasons["no-mask.png"].startswith("no mask") and reasons["no-image.png"].startswith("no image")
    assert "no masks/ folder" in reasons["images"]
    assert found.layouts == {str(kaggle): "kaggle", str(pair): "pair"}


def test_a_folder_in_neither_layout_is_a_dataset_error(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match="neither images/"):
        find_mask_pairs([str(tmp_path)])
    with pytest.raises(DatasetError, match="is not a folder"):
        find_mask_pairs([str(tmp_path / "missing")])


@pytest.mark.skipif(not (SHARED / "cxr-masks").is_dir(), reason=f"cxr-masks not present at {SHARED / 'cxr-masks'}")
def test_kaggle_mask_layout_on_cxr_masks():
    """The database's own layout: 299 px images beside 256 px 3-channel masks."""
    from cxrexp.images.decode import read_grey
    from cxrexp.lungs.masks import check_mask, mask_for_image

    found = find_mask_pairs([str(SHARED / "cxr-masks")])
    assert len(found.pairs) == 600 and not found.unpaired
    assert {p.source for p in found.pairs} == {"Viral Pneumonia"}
    first = found.pairs[0]
    image = read_grey(first.image)
    mask = read_grey(first.mask, min_side=1)
    assert image.shape != mask.shape  # sizes differ, as in the real database
    resized = mask_for_image(mask, image.shape)
    assert resized.shape == image.shape and check_mask(resized).plausible


@pytest.mark.skipif(not (SHARED / "lung-seg-nlm").is_dir(), reason=f"lung-seg-nlm not present at {SHARED / 'lung-seg-nlm'}")
def test_pair_layout_on_lung_seg_nlm():
    found = find_mask_pairs([str(SHARED / "lung-seg-nlm")], exclude=("*_0.png",))
    assert found.pairs and not found.unpaired
    assert {p.source for p in found.pairs} <= {"montgomery", "shenzhen"}
    assert all(Path(p.image).name.endswith("_1.png") for p in found.pairs)  # the normals left out


@pytest.mark.parametrize(
    "new, new_split, old, old_split, move",
    [
        (0.90, "s1", None, None, True),  # no champion yet
        (0.95, "s1", 0.95, "s1", True),  # no worse on the same split
        (0.94, "s1", 0.95, "s1", False),
        (0.99, "s1", 0.95, "s2", False),  # another split: not comparable
    ],
)
def test_segmenter_champion(new, new_split, old, old_split, move):
    moved, reason = segmenter_champion(new, new_split, old, old_split)
    assert moved is move and reason


def test_unet_shapes_and_masks_at_the_image_size():
    from cxrexp.lungs.segmenter import build_unet, predict_masks

    model = build_unet(32, base_filters=4, depth=2, seed=1)
    assert model.output_shape == (None, 32, 32, 1)
    masks = predict_masks(model, [np.zeros((50, 70), np.uint8), np.full((33, 33), 200, np.uint8)])
    assert [m.shape for m in masks] == [(50, 70), (33, 33)] and all(m.dtype == bool for m in masks)
    with pytest.raises(ValueError, match="divisible"):
        build_unet(30, depth=2)


@pytest.mark.parametrize("conv, layer", [("standard", "Conv2D"), ("separable", "SeparableConv2D")])
def test_unet_convolutions(conv, layer):
    """``conv`` builds every 3x3 convolution after the first (one grey channel) as ``layer``, with the
    same output and far fewer weights for ``separable``."""
    from cxrexp.lungs.segmenter import build_unet

    model = build_unet(32, base_filters=8, depth=2, seed=1, conv=conv)
    convs = [l for l in model.layers if l.name.endswith(("_conv1", "_conv2"))]
    assert type(convs[0]).__name__ == "Conv2D"  # the first one reads the grey channel
    assert {type(l).__name__ for l in convs[1:]} == {layer}
    assert model.output_shape == (None, 32, 32, 1)
    standard = build_unet(32, base_filters=8, depth=2, seed=1).count_params()
    assert (model.count_params() < standard / 3) is (conv == "separable")


def test_unet_refuses_an_unknown_convolution():
    from cxrexp.config import SegmentConfig
    from cxrexp.lungs.segmenter import build_unet

    with pytest.raises(ValueError, match="conv='dilated'"):
        build_unet(32, depth=2, conv="dilated")
    with pytest.raises(ValueError, match="standard, separable"):
        SegmentConfig(conv="dilated")


@pytest.fixture(scope="module")
def segment_run(tmp_path_factory):
    """`mlflow run . -e segment` on a few synthetic masks: train, log, register."""
    root = tmp_path_factory.mktemp("segment")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "-e", "segment", "--env-manager", "local",
               "--experiment-name", "segment-e2e", "-P", "image_size=32", "-P", "epochs=2", "-P", "synthetic_count=48",
               "-P", "synthetic_size=64", "-P", "base_filters=4", "-P", "registered_model_name=e2e-lung-seg",
               # separable here (main's tests train standard ones): the MLproject flag, and the layer
               # through MLflow's save and load
               "-P", "conv=separable"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root, env, done.stdout


def test_segment_step_logs_scores_and_registers_a_champion(segment_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    root, env, stdout = segment_run
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    try:
        client = MlflowClient()
        version = client.get_model_version_by_alias("e2e-lung-seg", "champion")
        run = client.get_run(version.tags["train_run_id"])
        for key in ("test_dice", "test_iou", "test_dice_synthetic", "n_test", "best_val_dice"):
            assert key in run.data.metrics, key
        assert 0.0 <= run.data.metrics["test_dice"] <= 1.0
        assert run.data.params["conv"] == "separable"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_dice")] == [0, 1]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"data", "figures", "test"} <= artifacts
        assert "test Dice" in stdout
        # The registered model takes raw PNG bytes and returns a mask at the image's own size.
        import cv2

        from cxrexp.mlflow_edge.segmenter_serving import decode_mask

        model = mlflow.pyfunc.load_model("models:/e2e-lung-seg@champion")
        png = cv2.imencode(".png", np.full((70, 50), 120, np.uint8))[1].tobytes()
        out = model.predict(pd.DataFrame({"image": [png, base64.b64encode(png).decode("ascii")]}))
        assert list(out.columns) == ["mask", "lung_area"]
        masks = [decode_mask(text) for text in out["mask"]]
        assert all(m.shape == (70, 50) for m in masks)
        np.testing.assert_allclose(out["lung_area"], [m.mean() for m in masks])
        with pytest.raises(Exception, match="row 0"):
            model.predict(pd.DataFrame({"image": [b"not an image"]}))
    finally:
        mlflow.set_tracking_uri(None)


def test_load_samples_skips_unreadable_masks_with_the_reason_and_writes_nothing(tmp_path):
    """A bad mask costs its pair only; a mask of another size is resized to its image; the folder is only read."""
    from cxrexp.config import SegmentConfig
    from cxrexp.mlflow_edge.segmenter_run import load_samples

    image = np.zeros((60, 80), np.uint8)
    image[10:50, 10:70] = 150
    lungs = np.zeros((30, 40), np.uint8)  # half the image's size: resized to it, then thresholded
    lungs[5:25, 4:18] = lungs[5:25, 22:36] = 255
    root = tmp_path / "pairs"
    for name in ("good.png", "bad-mask.png"):
        _png(root / "images" / name, image)
    _png(root / "masks" / "good.png", lungs)
    (root / "masks" / "bad-mask.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    samples = load_samples(SegmentConfig(mask_dirs=(str(root),)))
    assert [Path(n).name for n in samples.names] == ["good.png"]
    assert samples.masks[0].shape == (60, 80) and samples.masks[0].dtype == bool
    assert samples.masks[0][20, 15] and not samples.masks[0][20, 40]  # left lung in, the gap out
    (path, reason), = [s for s in samples.skipped if Path(s[0]).name == "bad-mask.png"]
    assert "truncated" in reason or "corrupt" in reason
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
