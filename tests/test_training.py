"""train_model on a tiny learnable toy set: learns, restores, reloads in a fresh process, fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cxrexp.config import TrainConfig
from cxrexp.data.tfdata import predict_probabilities, read_rows
from cxrexp.learn.losses import class_weights
from cxrexp.learn.training import (
    HISTORY_KEYS,
    TrainingDiverged,
    check_schedule,
    train_model,
)

SIZE = 32
N_IMAGES = 200
# Small and fast, but enough to find a bright blob in 5 epochs.
TOY_CONFIG = TrainConfig(
    filters=(8, 16), dense=(16,), dropout=0.1, learning_rate=3e-3, batch_size=16,
    epochs=5, patience=3, lr_patience=1, class_weight="inverse", seed=11,
)


def _toy_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (200, 32, 32) dim noise; every third image (label 1) has a bright disc of radius 4."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 90, (N_IMAGES, SIZE, SIZE), dtype=np.uint8)
    labels = (np.arange(N_IMAGES) % 3 == 0).astype(np.int64)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in np.flatnonzero(labels):
        cy, cx = rng.integers(8, SIZE - 8, 2)
        pixels[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] = 230
    return pixels, labels


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy set as a read-only memmap (like a prepared dataset) with a 150/50 split."""
    root = tmp_path_factory.mktemp("toy")
    pixels, labels = _toy_images()
    np.save(root / "images.npy", pixels)
    images = np.load(root / "images.npy", mmap_mode="r")
    rows = np.random.default_rng(1).permutation(N_IMAGES).astype(np.int64)
    train_rows, val_rows = rows[:150], rows[150:]
    return dict(
        root=root, images=images, train_rows=train_rows, train_labels=labels[train_rows],
        val_rows=val_rows, val_labels=labels[val_rows],
    )


class EpochRecorder(keras.callbacks.Callback):
    """Stands in for the MLflow epoch logger: keeps the logs each epoch ends with."""

    def __init__(self):
        super().__init__()
        self.logs: list[dict[str, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.logs.append(dict(logs or {}))


def _train(toy, cfg, callbacks=()):
    return train_model(
        cfg, toy["images"], SIZE, toy["train_rows"], toy["train_labels"], toy["val_rows"],
        toy["val_labels"], callbacks=callbacks, verbose=0,
    )


@pytest.fixture(scope="module")
def trained(toy):
    recorder = EpochRecorder()
    result = _train(toy, TOY_CONFIG, callbacks=[recorder])
    return result, recorder


def test_short_run_learns_the_toy_task(trained, toy):
    result, _ = trained
    assert result.best_val_auc > 0.8
    assert roc_auc_score(toy["val_labels"], result.val_probabilities) > 0.8
    assert 0.0 < result.threshold < 1.0
    # The default operating point: validation specificity at least target_specificity.
    called = result.val_probabilities >= result.threshold
    negatives = toy["val_labels"] == 0
    assert TOY_CONFIG.threshold_rule == "specificity"
    assert 1 - called[negatives].mean() >= TOY_CONFIG.target_specificity


def test_result_fields_are_consistent(trained, toy):
    result, _ = trained
    assert set(result.history) == set(HISTORY_KEYS)
    assert all(len(values) == result.epochs_trained for values in result.history.values())
    assert 1 <= result.epochs_trained <= TOY_CONFIG.epochs
    # Early stopping keeps the first epoch with the highest val_auc.
    assert result.best_epoch == int(np.argmax(result.history["val_auc"]))
    assert result.best_val_auc == result.history["val_auc"][result.best_epoch]
    assert result.history["learning_rate"][0] == pytest.approx(TOY_CONFIG.learning_rate)
    assert result.val_probabilities.dtype == np.float32
    assert result.val_probabilities.shape == toy["val_rows"].shape
    np.testing.assert_array_equal(result.val_labels, toy["val_labels"])
    assert result.class_weights == class_weights(toy["train_labels"], "inverse")
    # The returned model carries the restored weights the validation probabilities came from.
    again = predict_probabilities(result.model, toy["images"], toy["val_rows"], 32)
    np.testing.assert_allclose(again, result.val_probabilities, atol=1e-6)


def test_caller_callbacks_see_every_epoch_with_all_metrics(trained):
    result, recorder = trained
    assert len(recorder.logs) == result.epochs_trained
    for epoch, logs in enumerate(recorder.logs):
        assert set(HISTORY_KEYS) <= set(logs)
        assert logs["val_auc"] == pytest.approx(result.history["val_auc"][epoch])


def test_saved_model_reloads_in_a_fresh_process_without_cxrexp(trained, toy, tmp_path):
    result, _ = trained
    model_path = tmp_path / "model.keras"
    result.model.save(model_path)
    np.save(tmp_path / "val_images.npy", read_rows(toy["images"], toy["val_rows"]))
    script = textwrap.dedent(
        """
        import json, sys
        import numpy as np, keras
        model = keras.models.load_model(sys.argv[1])
        x = np.load(sys.argv[2]).astype("float32")[..., None] / 255.0
        probabilities = model.predict(x, batch_size=16, verbose=0).reshape(-1)
        np.save(sys.argv[3], probabilities)
        print(json.dumps({"cxrexp_imported": any(m.startswith("cxrexp") for m in sys.modules)}))
        """
    )
    out_path = tmp_path / "reloaded.npy"
    completed = subprocess.run(
        [sys.executable, "-c", script, str(model_path), str(tmp_path / "val_images.npy"), str(out_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == {"cxrexp_imported": False}
    np.testing.assert_allclose(np.load(out_path), result.val_probabilities, atol=1e-6)


def test_same_seed_same_run_with_augmentation(toy):
    cfg = replace(TOY_CONFIG, epochs=2, augment=True)
    first, second = _train(toy, cfg), _train(toy, cfg)
    np.testing.assert_allclose(first.history["loss"], second.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(first.val_probabilities, second.val_probabilities, atol=1e-5)


class StopAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.stop_training = True


class Pruned(Exception):
    """Stands in for optuna.TrialPruned."""


class PruneAfterFirstEpoch(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        raise Pruned(f"pruned at epoch {epoch}")


def test_caller_callback_can_stop_training(toy):
    result = _train(toy, replace(TOY_CONFIG, epochs=4), callbacks=[StopAfterFirstEpoch()])
    assert result.epochs_trained == 1
    assert result.best_epoch == 0


def test_caller_callback_exception_propagates(toy):
    with pytest.raises(Pruned, match="epoch 0"):
        _train(toy, replace(TOY_CONFIG, epochs=3), callbacks=[PruneAfterFirstEpoch()])


class PoisonWeights(keras.callbacks.Callback):
    """Sets every weight to NaN after the first batch: the next loss is NaN."""

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.model.set_weights([np.full_like(w, np.nan) for w in self.model.get_weights()])


@pytest.mark.parametrize(
    ("learning_rate", "callbacks"),
    [(1e10, ()), (TOY_CONFIG.learning_rate, (PoisonWeights(),))],
    ids=["huge-learning-rate", "nan-weights"],
)
def test_nan_loss_raises_training_diverged(toy, learning_rate, callbacks):
    cfg = replace(TOY_CONFIG, epochs=1, learning_rate=learning_rate)
    with pytest.raises(TrainingDiverged, match="NaN"):
        _train(toy, cfg, callbacks=list(callbacks))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patience=3, lr_patience=3), "lr_patience=3 must be >= 0 and below patience=3"),
        (dict(patience=2, lr_patience=5), "below patience=2"),
        (dict(patience=0, lr_patience=0), "patience=0"),
        (dict(lr_factor=1.0), "lr_factor"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(epochs=0), "epochs"),
    ],
)
def test_unusable_schedules_are_rejected_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_schedule(replace(TOY_CONFIG, **overrides))


def test_default_config_schedule_is_valid():
    check_schedule(TrainConfig())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("one-class-val", "val split has 0 negatives"),
        ("wrong-size", r"\(200, 32, 32\), expected \(N, 64, 64\)"),
        ("schedule", "lr_patience"),
    ],
)
def test_train_model_rejects_bad_inputs(toy, change, message):
    val_labels = toy["val_labels"]
    val_rows = toy["val_rows"]
    image_size = SIZE
    cfg = TOY_CONFIG
    if change == "one-class-val":
        val_rows = val_rows[val_labels == 1]
        val_labels = val_labels[val_labels == 1]
    elif change == "wrong-size":
        image_size = 64
    else:
        cfg = replace(TOY_CONFIG, lr_patience=TOY_CONFIG.patience)
    with pytest.raises(ValueError, match=message):
        train_model(
            cfg, toy["images"], image_size, toy["train_rows"], toy["train_labels"],
            val_rows, val_labels, verbose=0,
        )


@pytest.mark.parametrize("threshold, sensitivity, specificity", [(0.5, 2 / 3, 0.75), (0.05, 1.0, 0.25), (None, None, None)])
def test_validation_metrics_at_the_models_threshold(threshold, sensitivity, specificity):
    from cxrexp.learn.training import validation_metrics

    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    probabilities = np.array([0.9, 0.6, 0.1, 0.7, 0.2, 0.3, 0.04])
    found = validation_metrics(labels, probabilities, TrainConfig(), threshold)
    assert found.get("val_sensitivity") == (pytest.approx(sensitivity) if sensitivity is not None else None)
    assert found.get("val_specificity") == (pytest.approx(specificity) if specificity is not None else None)
    assert found["val_roc_auc"] == pytest.approx(8 / 12)


def test_the_mirrored_strategy_on_a_cpu_gives_the_default_strategys_model(toy):
    """-P strategy=mirrored on a machine without GPUs: one replica, and the same run as the default."""
    import tensorflow as tf

    from cxrexp.learn.devices import strategy_for

    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("several GPUs: mirrored runs several replicas here, with a larger global batch")
    assert strategy_for("mirrored").num_replicas_in_sync == 1
    cfg = replace(TOY_CONFIG, epochs=2)
    default, mirrored = _train(toy, cfg), _train(toy, replace(cfg, strategy="mirrored"))
    np.testing.assert_allclose(mirrored.history["loss"], default.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(mirrored.val_probabilities, default.val_probabilities, atol=1e-4)
    for a, b in zip(mirrored.model.get_weights(), default.model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_mixed_precision_is_not_turned_on_without_a_gpu(toy, caplog):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("GPUs present")
    result = _train(toy, replace(TOY_CONFIG, epochs=1, mixed_precision=True))
    assert all(w.dtype == np.float32 for w in result.model.get_weights())
    assert "mixed_precision=true ignored: no GPU here" in caplog.text
    assert keras.mixed_precision.dtype_policy().name == "float32"  # nothing leaks into later models
