"""The evaluate step: its own helpers, then end to end against a temporary MLflow store.

The pure sampling and audit helpers it uses (``cxrexp.audit``) are tested in tests/test_audit.py.

End to end: one tiny model is trained once for the module through ``cxrexp.cli.main(["train", ...])``
on the session's 48 px synthetic set; every evaluation then reuses it.
"""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrexp.config import EvaluateConfig
from cxrexp.evaluation import audit, gradcam
from cxrexp.evaluation.test_evaluation import training_overlap
from cxrexp.mlflow_edge.model_uri import ModelSource
from cxrexp.steps import evaluate_step as es

MODEL_NAME = "cxr-covid-cnn"


# --------------------------------------------------------------------------------------------------
# Step helpers (the pure sampling and audit helpers are tested in tests/test_audit.py)


def test_gradcam_unavailable():
    import keras

    from cxrexp.learn.model import build_cnn

    assert gradcam.unavailable_reason(build_cnn(32, (4,), (), 0.0, seed=1)) == ""
    inputs = keras.Input((8, 8, 1))
    dense_only = keras.Model(inputs, keras.layers.Dense(1, name="logit")(keras.layers.Flatten()(inputs)))
    assert "no Conv2D layer" in gradcam.unavailable_reason(dense_only)


@pytest.mark.parametrize(
    "source, expected",
    [
        (ModelSource("models:/m@champion", registered_name="cxr", version="3", train_run_id="a" * 32), "cxr v3"),
        (ModelSource("models:/m-1", model_id="m-1", train_run_id="0123456789" + "a" * 22), "run 01234567"),
        (ModelSource("runs:/x/model", source_run_id="b" * 32), "run bbbbbbbb"),
        (ModelSource("file:///tmp/model"), "model"),
    ],
)
def test_run_name(source, expected):
    assert source.label() == expected


@pytest.mark.parametrize(
    "name, test_hashes, expected",
    [
        ("the training dataset's own test split sharing an image with train", ["a", "b", "c"], 1),
        ("a clean test split", ["b", "c"], 0),
        ("two test images copying train and val", ["a", "x", "c"], 2),
    ],
)
def test_training_overlap_is_always_measured(name, test_hashes, expected):
    """Even when the test split is the training dataset's own (same digest): "c" is in its test split."""
    test = pd.DataFrame({"sha256": test_hashes})

    class Prepared:
        digest = "train-digest"
        manifest = pd.DataFrame({"sha256": ["a", "c", "x"], "split": ["train", "test", "val"]})

    assert training_overlap(test, None) is None
    assert training_overlap(test, Prepared()) == expected, name


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"threshold": 1.5}, "--threshold 1.5"),
        ({"prevalence": 2.0}, "--prevalence 2.0"),
        ({"n_bootstrap": -1}, "--n-bootstrap -1"),
        ({"gradcam_per_cell": -1}, "--gradcam-per-cell -1"),
        ({"min_lung_focus": 1.5}, "--min-lung-focus 1.5"),
        ({"min_lung_focus_lift": -0.5}, "--min-lung-focus-lift -0.5"),
        ({"min_lung_focus_lift": float("nan")}, "--min-lung-focus-lift nan"),
        ({"batch_size": 0}, "--batch-size 0"),
        ({"model_uri": " "}, "--model-uri is empty"),
        ({"min_audit_heatmaps": 0}, "--min-audit-heatmaps 0"),
        ({"occlusion_margin": 0.5}, "--occlusion-margin 0.5"),
        ({"occlusion_margin": -0.01}, "--occlusion-margin -0.01"),
        ({"occlusion_margin": float("nan")}, "--occlusion-margin nan"),
        ({"audit_lung_model": "models:/"}, "--audit-lung-model"),
    ],
)
def test_check_config(overrides, fragment):
    from cxrexp.errors import ConfigError as UserError

    with pytest.raises(UserError, match=fragment.replace("-", r"\-").replace(".", r"\.")):
        es.check_config(EvaluateConfig(**overrides))
    es.check_config(EvaluateConfig())  # the defaults are fine


# --------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def trained(session_store, synthetic_prepared):
    """A tiny model trained and registered as @challenger through the CLI; returns its train run."""
    import mlflow

    from cxrexp import cli

    code = cli.main([
        "train", "--data", str(synthetic_prepared.root), "--epochs", "2", "--filters", "8,16", "--dense", "8",
        "--patience", "2", "--lr-patience", "1", "--batch-size", "32", "--registered-model-name", MODEL_NAME,
        # A two-epoch model barely ranks: at 95% validation specificity it would call nothing positive,
        # and the audit below needs cases called positive.
        "--threshold-rule", "youden",
    ])
    assert code == 0
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'train'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    return runs[0]


def _evaluate(args: list[str]) -> tuple[int, str]:
    """Run ``cxrexp evaluate``; (exit code, id of the newest evaluate run or "")."""
    import mlflow

    from cxrexp import cli

    code = cli.main(["evaluate", *args])
    runs = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'evaluate'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    return code, (runs[0].info.run_id if runs else "")


def _evaluate_runs() -> int:
    import mlflow

    return len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.`cxrexp.step` = 'evaluate'",
                                  output_format="list"))


def _artifacts(run_id: str) -> set[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found, pending = set(), [""]
    while pending:
        for item in client.list_artifacts(run_id, pending.pop() or None):
            (pending.append(item.path) if item.is_dir else found.add(item.path))
    return found


def _download(run_id: str, path: str) -> Path:
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


FAST = ["--n-bootstrap", "200", "--gradcam-per-cell", "1"]


@pytest.fixture(scope="module")
def alias_run(trained):
    code, run_id = _evaluate(["--model-uri", f"models:/{MODEL_NAME}@challenger", "--prevalence", "0.1", *FAST])
    assert code == 0
    return run_id


def test_evaluate_logs_every_metric_and_artifact(alias_run, trained, synthetic_prepared):
    import mlflow

    from cxrexp.evaluation import metrics

    run = mlflow.get_run(alias_run)
    logged = run.data.metrics
    with_ci = metrics.RATE_NAMES + metrics.SCORE_NAMES + ("ppv_at_prevalence", "npv_at_prevalence")
    expected = {f"test_{n}" for n in ("tp", "fp", "tn", "fn", "n", "prevalence")}
    expected |= {f"test_{n}{suffix}" for n in with_ci for suffix in ("", "_ci_low", "_ci_high")}
    expected |= {"threshold", "audit_lung_focus_mean", "audit_lung_focus_median", "audit_border_share_mean",
                 "audit_n", "audit_passed"}
    assert expected <= set(logged), sorted(expected - set(logged))

    _, test_labels = synthetic_prepared.split_rows("test")
    assert logged["test_n"] == len(test_labels)
    assert logged["test_tp"] + logged["test_fn"] == test_labels.sum()
    assert logged["threshold"] == pytest.approx(float(trained.data.metrics["threshold"]))
    assert logged["audit_passed"] in (0.0, 1.0) and 0 < logged["audit_n"] <= audit.AUDIT_SAMPLE
    # The occlusion check: every synthetic test image has its mask, so it scores the whole test split,
    # and its whole view is the test split's own forward pass.
    assert logged["occlusion_n"] == len(test_labels)
    assert {"occlusion_lungs_only_roc_auc_ci_low", "occlusion_outside_only_auc_change_ci_high"} <= set(logged)
    assert logged["occlusion_whole_roc_auc"] == pytest.approx(logged["test_roc_auc"], abs=1e-6)
    assert {"occlusion_shape_only_roc_auc", "occlusion_shape_only_auc_change_ci_low"} <= set(logged)
    assert run.data.tags["cxrexp.occlusion"] == f"computed on {len(test_labels)} cases"

    tags = run.data.tags
    assert tags["cxrexp.train_run_id"] == trained.info.run_id
    assert tags["cxrexp.model_uri"] == f"models:/{MODEL_NAME}@challenger"
    assert tags["cxrexp.dataset_digest"] == synthetic_prepared.digest
    assert tags["cxrexp.training_dataset_digest"] == synthetic_prepared.digest
    assert tags["cxrexp.registered_model"] == MODEL_NAME and tags["cxrexp.model_version"].isdigit()
    assert tags["cxrexp.model_id"].startswith("m-")
    assert tags["cxrexp.audit"] == ("passed" if logged["audit_passed"] else "failed")
    assert tags["cxrexp.audit_reason"]
    assert tags["mlflow.runName"] == (f"evaluate {MODEL_NAME} v{tags['cxrexp.model_version']} "
                                      f"on {synthetic_prepared.digest[:8]}")
    assert tags["cxrexp.mlflow_evaluate"] == "ok: confusion counts agree"  # both classes in this split
    assert logged["mlflow_test_true_positives"] == logged["test_tp"]  # MLflow's own evaluator, cross-checked
    contexts = [i.tags[0].value for i in run.inputs.dataset_inputs if i.dataset.digest == synthetic_prepared.digest]
    assert contexts == ["test"]

    # The evaluated LoggedModel carries the test figures too, linked to this run and the test split.
    linked = {m.key: m for m in mlflow.get_logged_model(tags["cxrexp.model_id"]).metrics if m.run_id == alias_run}
    assert linked["test_roc_auc"].value == pytest.approx(logged["test_roc_auc"])
    assert linked["test_roc_auc"].dataset_digest == synthetic_prepared.digest
    assert {"test_sensitivity", "test_specificity", "test_roc_auc_ci_low"} <= set(linked)

    artifacts = _artifacts(alias_run)
    needed = {"predictions.csv", "metric_notes.json", "report.html", "audit/scores.csv", "gradcam/samples.csv"}
    needed |= {f"figures/{name}.png" for name in ("confusion_matrix", "roc", "pr", "calibration", "threshold_sweep",
                                                  "gradcam_gallery", "lung_focus", "occlusion_views")}
    assert needed <= artifacts, sorted(needed - artifacts)
    for cell in audit.CELLS:
        has_cases = logged[f"test_{cell.lower()}"] > 0
        assert (f"gradcam/{cell}_1_overlay.png" in artifacts) == has_cases, cell
        assert (f"gradcam/{cell}_1_contour.png" in artifacts) == has_cases, cell

    predictions = pd.read_csv(_download(alias_run, "predictions.csv"))
    assert list(predictions.columns[:4]) == ["source", "class_name", "label", "probability"]
    assert len(predictions) == len(test_labels)
    assert predictions["source"].tolist() == sorted(predictions["source"])
    assert (predictions["predicted"] == (predictions["probability"] >= logged["threshold"])).all()
    assert predictions["label"].sum() == test_labels.sum()


def test_report_holds_the_logged_metrics(alias_run):
    import mlflow

    logged = mlflow.get_run(alias_run).data.metrics
    document = _download(alias_run, "report.html").read_text()
    cells: dict[str, list[str]] = {}

    class Rows(HTMLParser):
        current = None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "tr" and "data-metric" in attrs:
                self.current = attrs["data-metric"]
                cells[self.current] = []
            elif tag == "td" and self.current:
                cells[self.current].append("")

        def handle_endtag(self, tag):
            if tag == "tr":
                self.current = None

        def handle_data(self, data):
            if self.current and cells[self.current]:
                cells[self.current][-1] += data

    Rows().feed(document)
    assert cells["tp"][1] == str(int(logged["test_tp"]))
    for name in ("sensitivity", "specificity", "roc_auc"):
        value = logged[f"test_{name}"]
        assert cells[name][1] == ("undefined" if math.isnan(value) else f"{value:.3f}"), name
    assert "data:image/png;base64," in document and "<script" not in document
    assert f"models:/{MODEL_NAME}@challenger" in document


def test_evaluate_by_logged_model_uri_with_explicit_data_and_threshold(alias_run, trained, synthetic_prepared):
    import mlflow

    model_uri = trained.data.tags["cxrexp.model_uri"]
    assert model_uri.startswith("models:/m-")
    # The model's own threshold, given as a flag: same calls, so the audit must draw the same images.
    threshold = round(trained.data.metrics["threshold"], 6)
    code, run_id = _evaluate(["--model-uri", model_uri, "--data", str(synthetic_prepared.root),
                              "--threshold", str(threshold), "--occlusion-margin", "0.2", *FAST])
    assert code == 0 and run_id != alias_run
    run = mlflow.get_run(run_id)
    assert float(run.data.params["occlusion_margin"]) == 0.2
    # A wider hidden region changes what the views show, not the cases or the whole view.
    first = mlflow.get_run(alias_run).data.metrics
    assert run.data.metrics["occlusion_n"] == first["occlusion_n"]
    assert run.data.metrics["occlusion_whole_roc_auc"] == pytest.approx(first["occlusion_whole_roc_auc"])
    assert run.data.metrics["threshold"] == pytest.approx(threshold)
    assert run.data.tags["cxrexp.threshold_source"] == "flag"
    assert run.data.tags["cxrexp.train_run_id"] == trained.info.run_id
    assert run.data.tags["mlflow.runName"] == f"evaluate run {trained.info.run_id[:8]} on {synthetic_prepared.digest[:8]}"
    assert "test_ppv_at_prevalence" not in run.data.metrics  # no --prevalence given
    # Same dataset, seed and calls: the same images are drawn for Grad-CAM and the audit, whatever the run.
    for artifact in ("audit/scores.csv", "gradcam/samples.csv"):
        first = pd.read_csv(_download(alias_run, artifact))
        second = pd.read_csv(_download(run_id, artifact))
        assert len(first) and first["source"].tolist() == second["source"].tolist(), artifact


def test_unknown_model_uri_exits_2_naming_it(trained, capsys):
    before = _evaluate_runs()
    code, _ = _evaluate(["--model-uri", f"models:/{MODEL_NAME}@no-such-alias"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"models:/{MODEL_NAME}@no-such-alias" in err and "challenger" in err  # names what exists
    code, _ = _evaluate(["--model-uri", "models:/not-a-model@challenger"])
    err = capsys.readouterr().err
    assert code == 2 and "not-a-model" in err and MODEL_NAME in err
    assert _evaluate_runs() == before


def _rewritten(dataset, out_dir: Path, *, image_size: int | None = None, drop_test_positives: bool = False):
    """A prepared dataset derived from ``dataset`` through the store's writer (so it has a real digest)."""
    import cv2

    from cxrexp.data.store import DatasetWriter

    size = image_size or dataset.image_size
    manifest = dataset.manifest.copy()
    if drop_test_positives:
        manifest.loc[(manifest["split"] == "test") & (manifest["label"] == 1), "split"] = "train"
    params = {k: v for k, v in dataset.params.items() if k not in ("digest", "format_version")}
    params["image_spec"] = {**params["image_spec"], "image_size": size}
    images, masks = dataset.images(), dataset.masks()
    with DatasetWriter(out_dir, f"derived-{size}-{int(drop_test_positives)}", images.shape[0], size) as writer:
        for row in manifest["row"]:
            image, mask = np.asarray(images[row]), np.asarray(masks[row])
            if size != dataset.image_size:
                image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
                mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
            writer.write(int(row), image, mask)
        return writer.finish(manifest, params, dataset.skipped())


def test_dataset_with_another_image_size_exits_2_before_any_run(trained, synthetic_prepared, tmp_path, capsys):
    other = _rewritten(synthetic_prepared, tmp_path, image_size=32)
    before = _evaluate_runs()
    code, _ = _evaluate(["--model-uri", f"models:/{MODEL_NAME}@challenger", "--data", str(other.root)])
    err = capsys.readouterr().err
    assert code == 2
    assert "image_size: model 48, data 32" in err and str(other.root) in err
    assert _evaluate_runs() == before


def test_empty_test_split_exits_2(trained, synthetic_prepared, tmp_path, capsys):
    from cxrexp.data.store import DatasetWriter

    manifest = synthetic_prepared.manifest.copy()
    manifest.loc[manifest["split"] == "test", "split"] = "val"
    params = {k: v for k, v in synthetic_prepared.params.items() if k not in ("digest", "format_version")}
    images, masks = synthetic_prepared.images(), synthetic_prepared.masks()
    with DatasetWriter(tmp_path, "no-test", images.shape[0], synthetic_prepared.image_size) as writer:
        for row in manifest["row"]:
            writer.write(int(row), np.asarray(images[row]), np.asarray(masks[row]))
        empty = writer.finish(manifest, params, synthetic_prepared.skipped())
    before = _evaluate_runs()
    code, _ = _evaluate(["--model-uri", f"models:/{MODEL_NAME}@challenger", "--data", str(empty.root)])
    assert code == 2 and "test split" in capsys.readouterr().err and _evaluate_runs() == before


def test_one_class_test_split_runs_with_nan_and_reasons(trained, synthetic_prepared, tmp_path):
    import mlflow

    negatives_only = _rewritten(synthetic_prepared, tmp_path, drop_test_positives=True)
    code, run_id = _evaluate(["--model-uri", f"models:/{MODEL_NAME}@challenger", "--data", str(negatives_only.root),
                              *FAST])
    assert code == 0
    run = mlflow.get_run(run_id)
    logged = run.data.metrics
    assert math.isnan(logged["test_sensitivity"]) and math.isnan(logged["test_roc_auc"])
    assert not math.isnan(logged["test_specificity"])
    notes = json.loads(_download(run_id, "metric_notes.json").read_text())
    assert "no positives" in notes["test_sensitivity"] and "no positives" in notes["test_roc_auc"]
    assert "no positives" in run.data.tags["cxrexp.note.test_roc_auc"]
    assert run.data.tags["cxrexp.mlflow_evaluate"].startswith("skipped")
    assert run.data.tags["cxrexp.training_dataset_digest"] == synthetic_prepared.digest
    document = _download(run_id, "report.html").read_text()
    assert "no positives in the test split" in document and "undefined" in document
    assert "Not computed: the" in document and "all one class" in document  # occlusion: a reason, no numbers
    assert "occlusion_whole_roc_auc" not in logged and logged["occlusion_n"] > 0
