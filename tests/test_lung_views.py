"""Lung views: the pure crop steps, fallback counting, the pipeline with a segmenter, and the served
model reproducing training's crop pixel for pixel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxrexp.config import ImageSpec
from cxrexp.lungs import fallbacks, view
from tests.conftest import tiny_preprocess_config


def two_lungs(h: int, w: int) -> np.ndarray:
    """Two hand-placed rectangles: rows h/5..4h/5, columns w/8..7w/16 and 9w/16..7w/8."""
    mask = np.zeros((h, w), bool)
    mask[h // 5: 4 * h // 5, w // 8: 7 * w // 16] = True
    mask[h // 5: 4 * h // 5, 9 * w // 16: 7 * w // 8] = True
    return mask


def rectangles(images):
    return [two_lungs(*im.shape) for im in images]


@pytest.mark.parametrize("shape, image_size, expected", [
    ((1000, 800), 128, (256, 205)),   # shrunk to the working size, aspect kept
    ((300, 300), 128, (256, 256)),
    ((200, 100), 128, (200, 100)),    # already small: never enlarged
    ((2000, 2000), 256, (512, 512)),  # at least twice the model's input
])
def test_working_image_size(shape, image_size, expected):
    grey = np.zeros(shape, np.uint8)
    assert view.working_image(grey, ImageSpec(image_size=image_size)).shape == expected


def test_finish_crops_to_the_widened_lung_box():
    spec = ImageSpec(image_size=32, lungs="crop", lung_model="models:/x/1", lung_margin=0.0, enhance="none")
    working = np.zeros((100, 80), np.uint8)
    working[20:80, 10:70] = 200  # exactly the box of the two rectangles below
    mask = two_lungs(100, 80)  # rows 20..79, columns 10..34 and 45..69
    image, lung_view = view.finish(working, mask, spec)
    assert lung_view.applied and lung_view.box == (20, 80, 10, 70)
    assert image.shape == (32, 32) and image.min() == 200  # nothing outside the box survived
    stored = view.view_mask(mask, lung_view, spec)
    assert stored.shape == (32, 32) and set(np.unique(stored)) == {0, 1}
    assert stored[:, 16].sum() == 0  # the gap between the lungs is still a gap after the crop


def test_finish_falls_back_on_an_implausible_mask():
    spec = ImageSpec(image_size=32, lungs="crop", lung_model="models:/x/1")
    working = np.full((64, 64), 90, np.uint8)
    image, lung_view = view.finish(working, np.zeros((64, 64), bool), spec)
    assert not lung_view.applied and lung_view.reason == "empty mask" and image.shape == (32, 32)


def test_key_fields_leave_lung_settings_out_only_without_a_lung_view():
    assert "lung_model" not in ImageSpec(lungs="none").key_fields()
    assert ImageSpec(lungs="crop", lung_model="models:/s/2").key_fields()["lung_model"] == "models:/s/2"
    with pytest.raises(ValueError, match="needs a segmenter"):
        ImageSpec(lungs="mask", lung_model="")


@pytest.mark.parametrize("fell_back_covid, fell_back_normal, warns", [
    (0, 0, False),
    (5, 10, False),    # the same 5% in both classes
    (40, 2, True),     # 40% vs 1%: the shortcut is back
    (1, 0, False),     # one image is not evidence
])
def test_fallback_warning(fell_back_covid, fell_back_normal, warns):
    names = pd.Series(["COVID"] * 100 + ["Normal"] * 200)
    fell_back = np.zeros(300, bool)
    fell_back[:fell_back_covid] = True
    fell_back[100:100 + fell_back_normal] = True
    assert fallbacks.count_by_class(names, fell_back) == {"COVID": fell_back_covid, "Normal": fell_back_normal}
    message = fallbacks.differing_rates_warning(names, fell_back)
    assert bool(message) == warns
    if warns:
        assert "COVID 40/100" in message and "Normal 2/200" in message


def test_pipeline_with_a_segmenter_records_crops_and_counts_fallbacks(tmp_path):
    from cxrexp.data.pipeline import run_preprocess

    calls = []

    def segmenter(images):
        calls.append(len(images))
        masks = rectangles(images)
        masks[0] = np.zeros_like(masks[0])  # the first image of every batch: an empty mask
        return masks

    cfg = tiny_preprocess_config(tmp_path, synthetic_count=80, lungs="crop", lung_model="models:/seg/7")
    dataset = run_preprocess(cfg, progress=False, lung_masks=segmenter).dataset
    manifest = dataset.manifest
    assert sum(calls) == 80 and max(calls) <= 32
    assert (~manifest["lung_crop"]).sum() == len(calls)  # one fallback per batch, nothing else
    assert set(manifest.loc[~manifest["lung_crop"], "lung_fallback_reason"]) == {"empty mask"}
    assert (manifest["mask_source"] == "dataset").all() and manifest["seg_dice"].between(0, 1).all()
    assert sum(dataset.params["lung_fallbacks"].values()) == len(calls)
    assert dataset.spec.lungs == "crop" and dataset.spec.lung_model == "models:/seg/7"
    # A lung view is another dataset than the whole images: another cache folder.
    whole = run_preprocess(tiny_preprocess_config(tmp_path, synthetic_count=80), progress=False).dataset
    assert whole.root != dataset.root and "lung_crop" not in whole.manifest


def test_a_lung_view_without_a_segmenter_is_refused(tmp_path):
    from cxrexp.data.pipeline import run_preprocess

    with pytest.raises(ValueError, match="lung_masks"):
        run_preprocess(tiny_preprocess_config(tmp_path, lungs="crop", lung_model="models:/seg/1"), progress=False)


def test_preprocess_without_a_registered_segmenter_says_how_to_make_one(tracking_uri):
    from cxrexp.config import PreprocessConfig
    from cxrexp.errors import ModelNotFound
    from cxrexp.mlflow_edge.preprocess_run import resolve_lungs

    with pytest.raises(ModelNotFound, match="-e segment") as refused:
        resolve_lungs(PreprocessConfig.flat())  # lungs=crop is the default
    assert "-P lungs=none" in str(refused.value) and "mask_dirs" in str(refused.value)
    assert resolve_lungs(PreprocessConfig.flat(lungs="none")).image.lung_model == ""


def test_served_model_crops_exactly_as_training_did(tmp_path_factory):
    """segment -> preprocess lungs=crop -> train -> the served model: same pixels as the stored ones."""
    import cv2

    from cxrexp import cli
    from cxrexp.images import synthetic
    from cxrexp.lungs.request_views import prepare_lung_rows
    from cxrexp.mlflow_edge import serving, tracking
    from tests.conftest import temp_mlflow_store

    root = tmp_path_factory.mktemp("lung-e2e")
    with temp_mlflow_store(root):
        import mlflow

        assert cli.main(["segment", "--image-size", "64", "--epochs", "8", "--synthetic-count", "80"]) == 0
        # Trained on synthetic masks: registered apart, so real preprocess runs never crop with it.
        assert mlflow.MlflowClient().search_registered_models() and not mlflow.MlflowClient().search_registered_models(
            "name='cxr-lung-seg'")
        assert cli.main(["preprocess", "--image-size", "48", "--synthetic-count", "120", "--lungs", "crop",
                         "--lung-model", "models:/cxr-lung-seg-synthetic@champion", "--workers", "1"]) == 0
        pre_run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'preprocess'", output_format="list")[0]
        assert pre_run.data.tags["cxrexp.lung_model"] == "models:/cxr-lung-seg-synthetic/1"
        dataset = tracking.resolve_prepared(pre_run.info.run_id)
        assert dataset.manifest["lung_crop"].mean() > 0.8  # a segmenter trained 8 epochs finds most lungs
        assert cli.main(["train", "--data", pre_run.info.run_id, "--epochs", "1"]) == 0
        train_run = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'train'", output_format="list")[0]
        assert train_run.data.tags["cxrexp.lung_model"] == "models:/cxr-lung-seg-synthetic/1"
        model = serving.load_pyfunc("models:/cxr-covid-cnn/1")
        rows = dataset.manifest.head(10)
        syn = synthetic.SyntheticSpec(**dataset.params["synthetic"])
        cells = [cv2.imencode(".png", synthetic.make_image(syn, int(s.rsplit("/", 1)[-1])).image)[1].tobytes()
                 for s in rows["source"]]
        python_model = model.unwrap_python_model()
        served = prepare_lung_rows(cells, python_model.serving_spec, python_model.lung_masks)
        stored = np.asarray(dataset.images())[rows["row"].to_numpy()]
        np.testing.assert_array_equal(np.rint(served.pixels[..., 0] * 255).astype(np.uint8), stored)
        np.testing.assert_array_equal(served.applied, rows["lung_crop"].to_numpy())
        answer = model.predict(pd.DataFrame({"image": cells}))
        assert list(answer.columns) == ["probability", "label", "lung_crop"]
        np.testing.assert_array_equal(answer["lung_crop"].to_numpy(), rows["lung_crop"].to_numpy())

        # External sets are cut by the segmenter the model carries: with the registry's segmenter gone,
        # evaluate still prepares and scores them.
        # The audit of a whole-image model segments test images that have no mask with the registry's
        # segmenter (resolved to its version); without one it says so and uses the geometric prior.
        from cxrexp.config import EvaluateConfig
        from cxrexp.lungs.masks import check_mask
        from cxrexp.mlflow_edge.evaluation_run import audit_segmenter
        from tests.test_external import _write_collection

        whole_image = serving.LoadedClassifier(None, dataset.spec, 0.5, None)
        audit_cfg = EvaluateConfig(audit_lung_model="models:/cxr-lung-seg-synthetic@champion")
        segment, name = audit_segmenter(audit_cfg, whole_image)
        assert name == "models:/cxr-lung-seg-synthetic/1"
        image = synthetic.make_image(syn, 0).image
        (mask,) = segment([image])
        assert mask.shape == image.shape and check_mask(mask).plausible
        assert audit_segmenter(EvaluateConfig(audit_lung_model=""), whole_image) == (None, "")

        mlflow.MlflowClient().delete_registered_model("cxr-lung-seg-synthetic")
        assert audit_segmenter(audit_cfg, whole_image) == (None, "")
        loaded = serving.load_classifier("models:/cxr-covid-cnn/1")
        assert loaded.lung_masks is not None
        external = _write_collection(root / "ext" / "ext-lungs", seed=11, count=16)
        assert cli.main(["evaluate", "--model-uri", "models:/cxr-covid-cnn/1", "--n-bootstrap", "20",
                         "--gradcam-per-cell", "0", "--external", str(external),
                         "--external-out-dir", str(root / "ext-prepared")]) == 0
        (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'evaluate'", output_format="list")
        assert run.data.metrics["external_ext_lungs_n"] + run.data.metrics["external_ext_lungs_n_dropped_duplicates"] == 16
        assert "audit_lung_focus_lift_mean" in run.data.metrics or run.data.metrics["audit_n"] < 10
        assert run.data.metrics["occlusion_n"] > 0  # the crops' stored segmenter masks cut the occlusion views


def test_a_segmenter_loaded_in_the_background_is_loaded_once_when_started_and_its_error_reaches_the_caller():
    from cxrexp.data.pipeline import BackgroundLungMasks
    from cxrexp.errors import ModelNotFound

    loads = []

    def load():
        loads.append(1)
        return lambda images: [image > 0 for image in images]

    masks = BackgroundLungMasks(load)
    assert loads == []  # nothing is loaded before run_preprocess has started its workers
    masks.start()
    first = masks([np.ones((4, 4), np.uint8)])
    second = masks([np.zeros((4, 4), np.uint8)])
    assert loads == [1] and first[0].all() and not second[0].any()

    def broken():
        raise ModelNotFound("models:/cxr-lung-seg/9 is not in the registry")

    failing = BackgroundLungMasks(broken)
    with pytest.raises(ModelNotFound, match="cxr-lung-seg/9"):  # the same error as a load in the caller's thread
        failing([np.ones((4, 4), np.uint8)])
