"""External validation in evaluate: names, duplicates of training images, the warning, end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cxrexp.evaluation import external
from cxrexp.evaluation.metrics import Evaluation

MODEL_NAME = "cxr-external-e2e"


@pytest.mark.parametrize(
    "folders, expected",
    [
        (["/d/ext-other"], ["ext_other"]),
        (["/a/ext-other/", "/b/ext-other"], ["ext_other", "ext_other_2"]),
        (["/d/cxr-external-dev", "/e/Hannover.NIH"], ["cxr_external_dev", "hannover_nih"]),
        (["/x/COVID vs normals"], ["covid_vs_normals"]),
    ],
)
def test_collection_names(folders, expected):
    assert external.collection_names(folders) == expected


def test_training_duplicates_exact_and_near():
    far = [format(v, "064x") for v in (0, (1 << 256) - 1)]
    near = format(1, "064x")  # 1 bit from 0
    dup = external.training_duplicates(
        external_sha256=["s-train", "s-new", "s-other"], external_phash=[far[1], near, format(1 << 128 | 0xFFFF, "064x")],
        training_sha256=["s-train", "s-x"], training_phash=[far[1], far[0]], max_distance=4,
    )
    # exact sha256; 1 bit from a training hash; far from both
    assert dup.tolist() == [True, True, False]
    assert external.training_duplicates([], [], ["a"], [far[0]], 4).tolist() == []


def _metrics(auc, low, high):
    return {"roc_auc": auc, "roc_auc_ci_low": low, "roc_auc_ci_high": high}


@pytest.mark.parametrize(
    "internal, ext, warns",
    [
        (_metrics(0.96, 0.93, 0.99), _metrics(0.76, 0.70, 0.82), True),  # wholly below
        (_metrics(0.96, 0.93, 0.99), _metrics(0.90, 0.84, 0.94), False),  # overlapping
        (_metrics(0.96, 0.93, 0.99), _metrics(math.nan, math.nan, math.nan), False),  # undefined: no claim
    ],
)
def test_external_warning(internal, ext, warns):
    text = external.external_warning("ext_other", internal, ext)
    assert bool(text) is warns
    if warns:
        assert "wholly below" in text and "ext_other" in text


def test_logged_metric_names():
    result = external.ExternalResult("ext_other", "/d", 10, 4, 1, 0, Evaluation({"roc_auc": 0.8, "tp": 3.0}, {}))
    assert external.logged_metrics(result) == {
        "external_ext_other_roc_auc": 0.8, "external_ext_other_tp": 3.0, "external_ext_other_n": 10,
        "external_ext_other_n_positive": 4, "external_ext_other_n_dropped_duplicates": 1,
        "external_ext_other_n_skipped": 0, "external_ext_other_occlusion_n": 0.0,  # not run: 0, never missing
    }


def test_logged_metric_names_with_the_occlusion_check():
    from cxrexp.evaluation.occlusion import OcclusionResult

    occluded = OcclusionResult(n=7, n_positive=0, reason="all one class")
    result = external.ExternalResult("ext_other", "/d", 10, 4, 1, 0, Evaluation({"roc_auc": 0.8}, {}), occlusion=occluded)
    assert external.logged_metrics(result)["external_ext_other_occlusion_n"] == 7.0
    assert external.card_values(result) == {"roc_auc": 0.8, "occlusion_n": 7.0}


def _write_collection(root: Path, seed: int, count: int, copy_of_training: np.ndarray | None = None,
                      with_masks: bool = False) -> Path:
    """A Kaggle-layout collection of synthetic X-rays (another seed: other images than training), with
    each image's lung mask under ``<Class>/masks`` when ``with_masks``."""
    import cv2

    from cxrexp.images import synthetic

    spec = synthetic.SyntheticSpec(count=count, size=128, seed=seed, prevalence=0.5)
    for item in synthetic.generate(spec):
        folder = root / ("COVID" if item.label else "Normal") / "images"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"ext-{item.index}.png"), item.image)
        if with_masks:
            (folder.parent / "masks").mkdir(exist_ok=True)
            cv2.imwrite(str(folder.parent / "masks" / f"ext-{item.index}.png"), item.mask * 255)
    if copy_of_training is not None:
        cv2.imwrite(str(root / "Normal" / "images" / "copied-from-training.png"), copy_of_training)
    (root / "Normal" / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def test_evaluate_scores_external_collections_and_drops_training_duplicates(session_store, synthetic_prepared,
                                                                            tmp_path, capsys):
    import mlflow

    from cxrexp import cli
    from cxrexp.images import synthetic

    code = cli.main(["train", "--data", str(synthetic_prepared.root), "--epochs", "1", "--filters", "8", "--dense", "8",
                     "--registered-model-name", MODEL_NAME])
    assert code == 0
    train_rows = synthetic_prepared.manifest[synthetic_prepared.manifest["split"] == "train"]
    index = int(str(train_rows.iloc[0]["source"]).rsplit("/", 1)[-1])
    training_image = synthetic.make_image(synthetic.SyntheticSpec(**synthetic_prepared.params["synthetic"]), index).image
    first = _write_collection(tmp_path / "data" / "ext-other", seed=7, count=24, copy_of_training=training_image,
                              with_masks=True)
    # The same images without the copy: synthetic X-rays look alike, so a few may be near-duplicates of
    # training images by perceptual hash anyway; the copy must add exactly one drop.
    second = _write_collection(tmp_path / "elsewhere" / "ext-other", seed=7, count=24)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")}
    code = cli.main(["evaluate", "--model-uri", f"models:/{MODEL_NAME}@challenger", "--n-bootstrap", "50",
                     "--gradcam-per-cell", "0", "--external", f"{first},{second}",
                     "--external-out-dir", str(tmp_path / "prepared")])
    assert code == 0
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                                filter_string="tags.`cxrexp.step` = 'evaluate'", order_by=["attributes.start_time DESC"])
    m = run.data.metrics
    with_copy, without = m["external_ext_other_n_dropped_duplicates"], m["external_ext_other_2_n_dropped_duplicates"]
    assert with_copy == without + 1
    assert m["external_ext_other_n"] + with_copy == 25 and m["external_ext_other_2_n"] + without == 24
    assert m["external_ext_other_n_skipped"] == 1  # broken.png, with its reason in the prepared skipped.csv
    for key in ("roc_auc", "roc_auc_ci_low", "sensitivity", "specificity", "ppv", "npv"):
        assert f"external_ext_other_{key}" in m
    assert 0.0 <= m["external_ext_other_roc_auc"] <= 1.0
    # The occlusion check on each collection: the first brings a mask for every film it keeps (the
    # copied training image, which has none, is dropped), so all of them are occluded and the whole
    # view is the collection's own forward pass.
    assert m["external_ext_other_occlusion_n"] == m["external_ext_other_n"]
    assert m["external_ext_other_occlusion_whole_roc_auc"] == pytest.approx(m["external_ext_other_roc_auc"], abs=1e-6)
    assert "external_ext_other_occlusion_lungs_only_roc_auc_ci_high" in m
    assert "external_ext_other_2_occlusion_n" in m  # no masks: occluded where a segmenter finds lungs, else none
    report = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="report.html",
                                                      dst_path=str(tmp_path / "dl"))).read_text()
    assert "external collections" in report and "ext_other_2" in report
    assert "ROC-AUC, lungs only" in report and "ROC-AUC, lungs hidden" in report
    # What promote's occlusion gate says, before any promote: of the test split, and of each collection.
    out = capsys.readouterr().out
    gate_lines = [line.strip() for line in out.splitlines() if "occlusion gate" in line or "judged by promote" in line]
    assert gate_lines[0].startswith("promote's occlusion gate (its defaults), test split: ")
    assert gate_lines[0].split(": ", 1)[1].startswith(("pass occlusion: with only the lungs shown",
                                                       "FAIL occlusion: with only the lungs shown"))
    assert [line.split(", judged")[0] for line in gate_lines[1:]] == ["external ext_other", "external ext_other_2"]
    assert gate_lines[1].split(": ", 1)[1].startswith(("pass external_occlusion: ext_other: with only the lungs shown",
                                                       "FAIL external_occlusion: ext_other: "))
    assert "What promote's occlusion gates" in report
    assert "external ext_other_2, judged by promote only with -P external=&lt;its folder&gt;" in report
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*")} == before  # nothing written there


def test_a_missing_external_folder_exits_2_before_any_run(session_store, tmp_path, capsys):
    from cxrexp import cli

    code = cli.main(["evaluate", "--external", str(tmp_path / "nowhere")])
    assert code == 2 and "not a folder" in capsys.readouterr().err


def test_a_collection_without_the_model_classes_exits_2_before_any_run(session_store, tmp_path, capsys):
    import mlflow

    from cxrexp import cli

    (tmp_path / "odd" / "Pneumonia").mkdir(parents=True)
    before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    code = cli.main(["evaluate", "--model-uri", f"models:/{MODEL_NAME}@challenger", "--external", str(tmp_path / "odd")])
    assert code == 2 and "COVID" in capsys.readouterr().err
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == before
