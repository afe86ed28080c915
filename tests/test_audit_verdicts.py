"""The shortcut audit tells a marker-reading model from a lung-reading one (no MLflow).

Two small CNNs are trained on the built-in synthetic set, identical except for the planted marker:
``synthetic_shortcut=1.0`` burns a bright letter into the border band of exactly the positives, so
a model can score well by reading the letter; the clean set has no marker, so the only signal is in
the lungs. The evaluate step's audit (``cxrexp.audit.shortcut_audit``: HiResCAM on the test cases
the model calls positive, salient region against the dataset's lung masks) must fail the first
model and pass the second at the default gates (``min_lung_focus``, ``min_lung_focus_lift``).

Settings (64 px, 600 images, balanced, 15 epochs) are the smallest that held across the seeds
tried while keeping the file near a minute. The scoring was tuned on these settings (seeds 42, 1, 2,
3), so this file shows the choice reproduces; benchmarks/audit_recheck.py re-checks it on other seeds
and sizes, on the validation split (docs/evaluate.md).
"""

from __future__ import annotations

import numpy as np
import pytest

from cxrexp.config import EvaluateConfig, TrainConfig
from cxrexp.promotion import GATE_NAMES, OCCLUSION_GATE, Evidence, Gates, decide

from .conftest import tiny_preprocess_config

IMAGE_SIZE = 64
TRAIN = TrainConfig(filters=(8, 16, 32), dense=(16,), epochs=15, patience=8, lr_patience=3, batch_size=32, seed=42)
MIN_LUNG_FOCUS = EvaluateConfig().min_lung_focus
MIN_LIFT = EvaluateConfig().min_lung_focus_lift


def _prepared(out_dir, shortcut: float):
    from cxrexp.data.pipeline import run_preprocess

    # The faint lesions these verdicts were measured on (docs/evaluate.md): at the built-in default
    # (0.16, chosen for main's model) the lesions are strong enough that the marker model reads them too,
    # and the premise (it does worse without its letter) no longer holds by the 0.1 this test asks.
    cfg = tiny_preprocess_config(out_dir, image_size=IMAGE_SIZE, synthetic_count=600, synthetic_size=128,
                                 synthetic_prevalence=0.5, synthetic_shortcut=shortcut, synthetic_faintest=0.04)
    return run_preprocess(cfg, progress=False).dataset


def _trained_and_audited(dataset):
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation import audit
    from cxrexp.evaluation.test_evaluation import evaluation_frame
    from cxrexp.learn.training import train_model

    train_rows, train_labels = dataset.split_rows("train")
    val_rows, val_labels = dataset.split_rows("val")
    result = train_model(TRAIN, dataset.images(), IMAGE_SIZE, train_rows, train_labels, val_rows, val_labels,
                         verbose=0)
    test = evaluation_frame(dataset)
    probabilities = predict_probabilities(result.model, dataset.images(), test["row"].to_numpy(np.int64), 64)
    cells = audit.confusion_cells(test["label"].to_numpy(), probabilities >= result.threshold)
    outcome, _ = audit.shortcut_audit(result.model, dataset, test, cells, min_lung_focus=MIN_LUNG_FOCUS, seed=42,
                                      min_lung_focus_lift=MIN_LIFT)
    return result.model, test, probabilities, outcome


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-prepared")
    return {"marker": _prepared(out, 1.0), "clean": _prepared(out, 0.0)}


@pytest.fixture(scope="module")
def marker_model(datasets):
    return _trained_and_audited(datasets["marker"])


@pytest.fixture(scope="module")
def clean_model(datasets):
    return _trained_and_audited(datasets["clean"])


def test_the_marker_model_reads_the_marker(marker_model, datasets):
    """The premise: on the same test images without the letter, the marker model does worse."""
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation.metrics import roc_auc

    model, test, probabilities, _ = marker_model
    clean = datasets["clean"]
    row_of = dict(zip(clean.manifest["source"], clean.manifest["row"]))  # same index, same anatomy
    unmarked = np.array([row_of[source] for source in test["source"]], dtype=np.int64)
    without_marker = predict_probabilities(model, clean.images(), unmarked, 64)
    labels = test["label"].to_numpy()
    assert roc_auc(labels, probabilities) > 0.9
    assert roc_auc(labels, without_marker) < roc_auc(labels, probabilities) - 0.1


def test_audit_fails_the_marker_model(marker_model):
    outcome = marker_model[3]
    result = outcome.result
    assert result.n >= 10  # enough positive calls to judge
    assert not result.passed, result.reason
    assert result.lung_focus_mean < MIN_LUNG_FOCUS - 0.15, result.reason
    assert result.border_share_mean > 0.5, result.reason  # the evidence sits where the letters are
    assert "looks outside the lungs" in result.reason


def test_audit_passes_the_clean_model(clean_model):
    outcome = clean_model[3]
    result = outcome.result
    assert result.n >= 10
    assert result.passed, result.reason
    assert result.lung_focus_mean > MIN_LUNG_FOCUS + 0.15, result.reason
    assert result.border_share_mean < 0.45, result.reason
    assert outcome.mask_note.startswith("lung masks: ") and "prior" not in outcome.mask_note  # synthetic masks
    assert result.lung_focus_lift_mean > 1.5, result.reason  # evidence concentrated in the lungs


def _occlusion(model_fixture, dataset):
    """The occlusion check (cxrexp.evaluation.occlusion) on the test cases, with the dataset's own masks."""
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.evaluation.occlusion import run_occlusion

    model, test, _, _ = model_fixture
    rows = test["row"].to_numpy(np.int64)
    images = np.stack([np.asarray(dataset.images()[int(r)]) for r in rows])
    masks = np.stack([np.asarray(dataset.masks()[int(r)]) for r in rows])

    def predict(pixels):
        return predict_probabilities(model, pixels, np.arange(len(pixels)), 64)

    return run_occlusion(images, masks, test["label"].to_numpy(), predict, n_bootstrap=500, seed=42)


def test_occlusion_finds_the_marker_models_evidence_outside_the_lungs(marker_model, datasets):
    """With the lungs hidden the marker model still ranks by its letter; with only the lungs it loses."""
    result = _occlusion(marker_model, datasets["marker"])
    # the occlusion's own forward pass (views as arrays) is the evaluation's (rows of the store)
    from cxrexp.evaluation.metrics import roc_auc

    _, test, probabilities, _ = marker_model
    assert result.auc["whole"][0] == pytest.approx(roc_auc(test["label"].to_numpy(), probabilities), abs=1e-6)
    value, low, _ = result.auc["outside_only"]
    assert low > 0.5 and value > 0.8, result.reading
    assert result.change["lungs_only"].high < 0, result.reading
    assert "still ranks" in result.reading[0] and "loses" in result.reading[1]
    assert "cannot be told from chance" in result.reading[2]  # the synthetic lungs' shape says nothing of the label
    # and promote's occlusion gate, at its default margin, refuses it from these figures
    decision = decide(Evidence("marker", metrics=result.logged_metrics(), occlusion_margin=0.1), None, Gates())
    assert not decision.gate_values[OCCLUSION_GATE]["passed"]
    assert "FAIL occlusion" in decision.reasons[GATE_NAMES.index(OCCLUSION_GATE)]


def test_occlusion_finds_the_clean_models_evidence_inside_the_lungs(clean_model, datasets):
    """With only the lungs the clean model keeps its ranking; hiding them costs it, and far more.

    Not asserted: that it is at chance with the lungs hidden. On one host it was; on another (same
    code, seed and data; an AMD EPYC, whose float kernels train a slightly different model) it ranked
    at 0.668 [0.546, 0.806] with the lungs hidden on these 60 cases, while keeping 0.806 of its 0.818
    with the lungs only. What the test holds to is the contrast, which held on both.
    """
    result = _occlusion(clean_model, datasets["clean"])
    lungs_only, hidden = result.change["lungs_only"], result.change["outside_only"]
    assert lungs_only.low <= 0 <= lungs_only.high, result.reading  # no loss the cases can resolve
    assert "no loss the test cases can resolve" in result.reading[1]
    assert hidden.high < 0, result.reading  # hiding the lungs costs it
    assert result.auc["lungs_only"][0] - result.auc["outside_only"][0] > 0.1, result.reading
    assert "cannot be told from chance" in result.reading[2]
