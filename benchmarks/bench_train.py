"""Training input throughput and served-model throughput on the real cxr-mini set (1,200 PNGs).

Run from the project root:

    python benchmarks/bench_train.py

cxr-mini is prepared once with ``pipeline.run_preprocess`` (defaults: 128 px, CLAHE 2.0/8x8) into
``.cxrexp/prepared`` under the project root (the same cache ``cxrexp preprocess`` uses there; reused
when it is already complete; ``--out-dir`` to put it elsewhere). Model, batch size and seeds are
``TrainConfig`` defaults for both parts (``--preset seed``: the published architecture, 32-32-64-128-256
filters and dense 256-128, at ``--image-size``; the served-model ratio depends on how much the forward
pass costs next to the PNG decode).

(a) Training images/second over the train split, class-weighted like ``train_model``:
    - ``make_dataset`` over the prepared memmap exactly as ``train_model`` calls it (``cache=None``:
      the split is read once into RAM), and with ``cache=False`` (every batch read from the memmap);
    - baselines with everything already in memory as float32: ``tf.data.Dataset.from_tensor_slices``
      ``((x, y, w)).shuffle(n).batch(B).prefetch``, and ``model.fit`` on the NumPy arrays.
    One model per variant (same seed, same initial weights), one warm-up epoch each (tracing), then
    ``--epochs`` timed epochs taken in rounds (A B C D, B C D A, ...) so that a change in the
    machine's load hits every variant alike; median epoch time. Target: make_dataset / from_tensor_slices
    >= 0.9.
(b) Served-model throughput: the (briefly trained) model of (a) is logged with
    ``serving.log_raw_image_model`` into a temporary MLflow store and loaded back with
    ``mlflow.pyfunc.load_model``; ``predict`` is called on DataFrames of ``--serve-batch`` rows whose
    ``image`` column holds the real PNG files' bytes (what a client sends). Baseline: Keras
    ``model.predict(x, batch_size=--serve-batch)`` on the same images already prepared as float32.
    Also shown: Keras ``predict_on_batch`` over the same batches (the compiled step the pyfunc calls,
    without ``model.predict``'s per-call tf.data pipeline; ``model.predict``'s pass time is bimodal on
    the 2-core machines, one of two times for the same pass), ``request_images.prepare_batch`` alone
    (decode + CLAHE + resize), to see where the time goes, and the untuned path (rows decoded one by one, then an eager ``model(chunk)`` call per 32 rows: what
    ``RawImageClassifier.predict`` did before it decoded in threads and used ``predict_on_batch``).
    Median of ``--repeats`` passes over ``--serve-images`` images, in rotating order. Target: pyfunc / Keras >= 0.7.

Nothing is written outside the prepared-data cache and a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import CXR_MINI, PROJECT_ROOT, has_cxr_mini, load_average  # noqa: E402  (benchmarks/common.py)

FIT_TARGET = 0.9
SERVE_TARGET = 0.7
MEMMAP = "make_dataset(memmap), as train_model"
TENSORS = "from_tensor_slices(float32 in RAM)"
NUMPY = "model.fit(numpy float32 in RAM)"
PYFUNC = "pyfunc.predict(PNG bytes)"
KERAS = "keras model.predict(float32)"
KERAS_BATCH = "keras predict_on_batch(float32)"
NAIVE = "untuned: 1 decode thread, eager call"

sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def prepare_data(data_dir: Path, out_dir: Path, image_size: int):
    """The prepared cxr-mini (reused when already complete): ``PreparedDataset``."""
    from cxrexp.config import PreprocessConfig
    from cxrexp.data.pipeline import run_preprocess

    result = run_preprocess(
        PreprocessConfig.flat(data_dir=str(data_dir), out_dir=str(out_dir), image_size=image_size,
                              lungs="none", exclude=()),  # whole images: training cost, not the lung view
        progress=False
    )
    state = "reused" if result.reused else f"prepared in {result.seconds:.1f} s"
    print(f"prepared dataset: {result.dataset.root} ({state})")
    return result.dataset


# ------------------------------------------------------------------------------------------- (a)


def epoch_timer():
    """A Keras callback recording each epoch's wall and process-CPU seconds (begin to end, so fit's setup
    is excluded). CPU time counts every thread of this process (TensorFlow's and tf.data's) and is far
    less disturbed than wall time by other processes on a shared machine."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.wall: list[float] = []
            self.cpu: list[float] = []
            self._started = (0.0, 0.0)

        def on_epoch_begin(self, epoch, logs=None):
            self._started = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            self.wall.append(time.perf_counter() - self._started[0])
            self.cpu.append(time.process_time() - self._started[1])

    return EpochTimer()


@dataclass
class Timings:
    """Wall and process-CPU seconds of repeated runs of one variant over ``n`` images."""

    n: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.n / statistics.median(self.wall)

    @property
    def best_images_per_second(self) -> float:
        return self.n / min(self.wall)

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * statistics.median(self.cpu) / self.n


def timed(run) -> tuple[float, float]:
    """(wall, process-CPU) seconds of ``run()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def rotations(names: list[str], rounds: int):
    """Round r runs the names starting at position r: no variant always runs first (right after
    another variant's work), and a change of the machine's load hits every variant alike."""
    for r in range(rounds):
        k = r % len(names)
        yield r, names[k:] + names[:k]


def fit_variants(dataset, cfg, n_epochs: int):
    """({variant: Timings of training epochs}, {variant: Timings of iterating the input alone},
    the model of the first variant)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from cxrexp.data.tfdata import make_dataset, read_rows
    from cxrexp.learn.losses import class_weights
    from cxrexp.learn.model import build_cnn_from_config

    images = dataset.images()
    rows, labels = dataset.split_rows("train")
    weights = class_weights(labels, cfg.class_weight, cfg.effective_beta)
    n = rows.size

    # The in-memory baselines: the same uint8 split loaded into RAM, then float32 in [0, 1].
    x_float = read_rows(images, rows).astype(np.float32)[..., None] / np.float32(255.0)
    y_float = labels.astype(np.float32)[:, None]
    w_float = np.where(labels == 1, weights[1], weights[0]).astype(np.float32)

    def memmap_as_train_model():
        return make_dataset(images, rows, labels, cfg.batch_size, shuffle=True, seed=cfg.seed, weights=weights)

    def memmap_streamed():
        return make_dataset(
            images, rows, labels, cfg.batch_size, shuffle=True, seed=cfg.seed, weights=weights, cache=False
        )

    def tensor_slices():
        return (
            tf.data.Dataset.from_tensor_slices((x_float, y_float, w_float))
            .shuffle(n, seed=cfg.seed, reshuffle_each_iteration=True)
            .batch(cfg.batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )

    variants = {
        MEMMAP: memmap_as_train_model,
        "make_dataset(memmap, cache=False)": memmap_streamed,
        TENSORS: tensor_slices,
        NUMPY: None,
    }
    models, datasets = {}, {}
    fits = {name: Timings(n) for name in variants}
    inputs = {name: Timings(n) for name, make in variants.items() if make is not None}
    for name, make in variants.items():
        keras.utils.set_random_seed(cfg.seed)
        model = build_cnn_from_config(cfg, dataset.image_size)
        model.compile(
            optimizer=keras.optimizers.Adam(cfg.learning_rate),
            loss=keras.losses.BinaryCrossentropy(),
            metrics=[keras.metrics.AUC(name="auc")],
        )
        models[name], datasets[name] = model, (make() if make else None)

    def one_epoch(name: str) -> tuple[float, float]:
        timer = epoch_timer()
        if datasets[name] is None:
            models[name].fit(
                x_float, y_float, sample_weight=w_float, batch_size=cfg.batch_size, shuffle=True,
                epochs=1, verbose=0, callbacks=[timer],
            )
        else:
            # shuffle=False as in train_model: the dataset shuffles itself.
            models[name].fit(datasets[name], epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        return timer.wall[0], timer.cpu[0]

    for name in variants:  # warm-up: tracing and the first read of the split
        print(f"  warm-up {name}: {one_epoch(name)[0]:.2f} s", flush=True)
    for r, order in rotations(list(variants), n_epochs):
        for name in order:
            wall, cpu = one_epoch(name)
            fits[name].wall.append(wall)
            fits[name].cpu.append(cpu)
        print(f"  round {r + 1}/{n_epochs} wall s: " + ", ".join(f"{t.wall[-1]:.2f}" for t in fits.values())
              + f" (load {load_average()})", flush=True)

    # The input pipelines alone (no model): what each costs per epoch by itself.
    def drain(name: str) -> None:
        for _ in datasets[name]:
            pass

    for name in inputs:
        drain(name)
    for _, order in rotations(list(inputs), 3):
        for name in order:
            wall, cpu = timed(lambda: drain(name))
            inputs[name].wall.append(wall)
            inputs[name].cpu.append(cpu)
    return fits, inputs, models[MEMMAP]


# ------------------------------------------------------------------------------------------- (b)


def serve_comparison(dataset, model, n_images: int, batch: int, repeats: int, tmp: Path):
    """({path: Timings}, images served, largest |pyfunc - keras| probability gap)."""
    import mlflow
    import numpy as np
    import pandas as pd

    from cxrexp.data.tfdata import read_rows
    from cxrexp.images import request_images
    from cxrexp.mlflow_edge import serving

    manifest = dataset.manifest.sort_values("row").head(n_images)
    sources = [Path(s) for s in manifest["source"]]
    if not all(p.is_file() for p in sources):
        raise FileNotFoundError(f"the prepared dataset's sources are not all present (e.g. {sources[0]})")
    png_bytes = [p.read_bytes() for p in sources]
    frames = [pd.DataFrame({request_images.INPUT_COLUMN: png_bytes[i : i + batch]}) for i in range(0, len(png_bytes), batch)]
    x_float = read_rows(dataset.images(), manifest["row"].to_numpy(np.int64)).astype(np.float32)[..., None] / 255.0

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("bench-train")
    with mlflow.start_run():
        info = serving.log_raw_image_model(
            model, dataset.spec, 0.5, input_example_png=png_bytes[0], keras_flavour_name=None,
            positive_label=dataset.positive_class, negative_label=dataset.negative_label,
        )
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    spec = pyfunc.unwrap_python_model().serving_spec

    def run_pyfunc() -> None:
        for frame in frames:
            pyfunc.predict(frame)

    def run_prepare() -> None:
        for frame in frames:
            request_images.prepare_batch(frame[request_images.INPUT_COLUMN], spec)

    def run_keras() -> None:
        model.predict(x_float, batch_size=batch, verbose=0)

    def run_keras_batches() -> None:
        # The compiled predict step the pyfunc itself calls, without model.predict's per-call tf.data
        # pipeline: a steadier baseline (model.predict's pass time is bimodal on the 2-core machine).
        for start in range(0, len(x_float), batch):
            model.predict_on_batch(x_float[start : start + batch])

    def run_naive() -> None:
        # What RawImageClassifier.predict did before it was tuned (commit d3ed74d): rows decoded one
        # after another, then an eager model call per chunk of PREDICT_CHUNK rows.
        for frame in frames:
            pixels = request_images.prepare_batch(frame[request_images.INPUT_COLUMN], spec, workers=1)
            for start in range(0, len(pixels), request_images.PREDICT_CHUNK):
                np.asarray(model(pixels[start : start + request_images.PREDICT_CHUNK], training=False))

    # Same answers (up to float noise) before timing anything: the comparison is of equal work.
    served = np.concatenate([pyfunc.predict(f)["probability"].to_numpy() for f in frames])
    direct = model.predict(x_float, batch_size=batch, verbose=0).reshape(-1)
    largest_gap = float(np.max(np.abs(served - direct)))
    if largest_gap > 1e-4:
        raise RuntimeError(f"pyfunc and Keras disagree by up to {largest_gap:.2g}: not the same preprocessing")

    runs = {PYFUNC: run_pyfunc, "request_images.prepare_batch only": run_prepare, KERAS: run_keras,
            KERAS_BATCH: run_keras_batches, NAIVE: run_naive}
    timings = {name: Timings(len(png_bytes)) for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _, order in rotations(list(runs), repeats):
        for name in order:
            wall, cpu = timed(runs[name])
            timings[name].wall.append(wall)
            timings[name].cpu.append(cpu)
    return timings, len(png_bytes), largest_gap


def print_table(title: str, timings: dict[str, Timings], extra: dict[str, Timings] | None = None) -> None:
    print(title)
    head = f"{'variant':<38} {'img/s median':>12} {'img/s best':>10} {'CPU ms/img':>10}"
    if extra is not None:
        head += f" {'input alone img/s':>17}"
    print(head + "   wall s each")
    for name, t in timings.items():
        line = f"{name:<38} {t.images_per_second:>12.1f} {t.best_images_per_second:>10.1f} {t.cpu_ms_per_image:>10.2f}"
        if extra is not None:
            line += f" {extra[name].images_per_second:>17.0f}" if name in extra else f" {'-':>17}"
        print(line + "   " + " ".join(f"{w:.2f}" for w in t.wall))


def print_ratio(label: str, mine: Timings, base: Timings, target: float | None = None) -> None:
    ratio = mine.images_per_second / base.images_per_second
    cpu_ratio = base.cpu_ms_per_image / mine.cpu_ms_per_image
    text = f"ratio {label}: {ratio:.3f} (median wall), {cpu_ratio:.3f} (CPU time)"
    if target is not None:
        text += f"   target >= {target}: {'ok' if ratio >= target else 'MISSED'}"
    print(text)


# ------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=CXR_MINI)
    parser.add_argument("--out-dir", type=Path, default=PROJECT_ROOT / ".cxrexp" / "prepared",
                        help="prepared-data cache (reused when complete)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--preset", default="default", choices=["default", "seed"],
                        help="model and batch size: TrainConfig defaults, or the published architecture")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per variant, after one warm-up")
    parser.add_argument("--serve-images", type=int, default=512)
    parser.add_argument("--serve-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes of each serving variant")
    args = parser.parse_args()

    if not has_cxr_mini(args.data_dir):
        return 2

    from dataclasses import replace

    import tensorflow as tf

    from cxrexp.config import TrainConfig, apply_preset

    cfg = apply_preset(replace(TrainConfig(), preset=args.preset), set())
    print(f"cores: {os.cpu_count()}; GPUs: {len(tf.config.list_physical_devices('GPU'))}; "
          f"tensorflow {tf.__version__}; load average at start: {load_average()}")
    dataset = prepare_data(args.data_dir, args.out_dir, args.image_size)
    print(f"model (TrainConfig, preset={cfg.preset}): filters {cfg.filters}, batch_norm {cfg.batch_norm}, dense {cfg.dense}; "
          f"batch {cfg.batch_size}; seed {cfg.seed}; {dataset.image_size} px")

    print("(a) training epochs:", flush=True)
    fits, inputs, model = fit_variants(dataset, cfg, args.epochs)
    load_after_fit = load_average()
    print("(b) serving:", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        served, n_served, gap = serve_comparison(
            dataset, model, args.serve_images, args.serve_batch, args.repeats, Path(tmp)
        )
    load_end = load_average()

    n_train = fits[MEMMAP].n
    print()
    print_table(f"(a) training, train split of {n_train} images, batch {cfg.batch_size}, {args.epochs} epochs "
                f"after a warm-up (load average after: {load_after_fit})", fits, inputs)
    print_ratio("make_dataset(memmap) / from_tensor_slices", fits[MEMMAP], fits[TENSORS], FIT_TARGET)
    print_ratio("make_dataset(memmap) / model.fit(numpy)", fits[MEMMAP], fits[NUMPY])
    print()
    print_table(f"(b) serving, {n_served} real PNGs (224x224) in batches of {args.serve_batch}, {args.repeats} "
                f"passes (load average at end: {load_end}; largest |pyfunc - keras| {gap:.1e})", served)
    print_ratio("pyfunc(PNG bytes) / keras predict(float32)", served[PYFUNC], served[KERAS], SERVE_TARGET)
    print_ratio("pyfunc(PNG bytes) / keras predict_on_batch(float32)", served[PYFUNC], served[KERAS_BATCH])
    print_ratio("untuned path / keras predict(float32)", served[NAIVE], served[KERAS])
    return 0


if __name__ == "__main__":
    sys.exit(main())
