"""The lung segmenter's forward pass under other network builds and runtimes, against the product's.

Run from the project root (needs no data):

    python benchmarks/bench_segmenter_runtime.py [--image-size 64] [--batch 32] [--repeats 7]

Named baseline: the product's U-Net (``lungs.segmenter.build_unet``, ``conv="standard"``, base 16
filters) run as preprocess runs it, Keras ``predict_on_batch``. Each row times the same batch of
``--batch`` images at ``--image-size`` (median of ``--repeats`` calls after two warm-up calls) and
prints ms per image and the ratio to the baseline:

- ``conv="separable"`` (``segment -P conv=separable``) under the same runtime;
- a ``tf.function`` graph of the model call, and the same with XLA (``jit_compile=True``);
- a TensorFlow Lite conversion (``model.export`` as a SavedModel, then
  ``tf.lite.TFLiteConverter.from_saved_model``, run by ``tf.lite.Interpreter`` with 2 threads), with
  the largest difference from the Keras output, so a conversion that lost the weights cannot pass
  for a fast one;
- an ONNX Runtime session on a ``tf2onnx`` conversion of the Keras model (the converter Keras 3's own
  ONNX export uses for TensorFlow), with the same difference column. Neither package is a cxrexp
  dependency: the row says "not installed" unless ``pip install onnxruntime tf2onnx`` was run (best
  in a virtual environment of its own made with ``--system-site-packages``).

The networks are untrained: a forward pass costs the same whatever the weights. Why it exists:
docs/lungs.md ("What a lung view costs") decides whether a cheaper runtime or network could bring
``lungs=crop`` preprocess to half the throughput of ``lungs=none``; these are its figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import numpy as np
from common import load_average  # noqa: E402  (benchmarks/common.py)


def per_image_ms(fn: Callable[[np.ndarray], object], batch: np.ndarray, repeats: int) -> float:
    fn(batch)
    fn(batch)  # warm-up: tracing, compilation, the allocator
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / len(batch)


def tflite_runner(model, batch: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The model exported as a SavedModel (Keras 3's ``model.export``), converted to TensorFlow Lite.
    (A conversion straight from a concrete function of the Keras 3 model returned NaN: the weights
    did not come along. The SavedModel route keeps them, and the difference column checks it.)"""
    import tempfile

    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="bench-tflite-") as folder:
        model.export(folder, format="tf_saved_model", input_signature=[tf.TensorSpec(batch.shape, tf.float32)],
                     verbose=False)
        blob = tf.lite.TFLiteConverter.from_saved_model(folder).convert()
    interpreter = tf.lite.Interpreter(model_content=blob, num_threads=2)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target)

    return run


def onnxruntime_runner(model, batch: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The model converted by tf2onnx (opset 17), run by an ONNX Runtime CPU session (its default threads).
    Raises ImportError when either package is missing."""
    import onnxruntime
    import tensorflow as tf
    import tf2onnx

    signature = (tf.TensorSpec((None, *batch.shape[1:]), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=17)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from cxrexp.lungs.segmenter import build_unet

    print(f"load average at start: {load_average()}; {args.image_size} px, batch {args.batch}, "
          f"median of {args.repeats}, untrained networks")
    batch = np.random.default_rng(0).random((args.batch, args.image_size, args.image_size, 1), dtype=np.float32)
    rows: list[tuple[str, float, str]] = []
    for conv in ("standard", "separable"):
        model = build_unet(args.image_size, conv=conv)
        reference = np.asarray(model.predict_on_batch(batch))
        graph = tf.function(lambda x, m=model: m(x, training=False))
        xla = tf.function(lambda x, m=model: m(x, training=False), jit_compile=True)
        rows.append((f"{conv}, Keras predict_on_batch", per_image_ms(model.predict_on_batch, batch, args.repeats), ""))
        rows.append((f"{conv}, tf.function", per_image_ms(lambda x, g=graph: g(x).numpy(), batch, args.repeats), ""))
        rows.append((f"{conv}, tf.function with XLA", per_image_ms(lambda x, g=xla: g(x).numpy(), batch, args.repeats), ""))
        try:
            run = tflite_runner(model, batch)
            gap = float(np.abs(run(batch) - reference).max())
            rows.append((f"{conv}, TensorFlow Lite", per_image_ms(run, batch, args.repeats),
                         f"largest difference from Keras {gap:.1e}"))
        except Exception as err:  # noqa: BLE001 - a runtime that cannot convert is a finding, not a crash
            rows.append((f"{conv}, TensorFlow Lite", float("nan"), f"conversion failed: {type(err).__name__}: {err}"[:160]))
        try:
            run = onnxruntime_runner(model, batch)
            gap = float(np.abs(run(batch) - reference).max())
            rows.append((f"{conv}, ONNX Runtime", per_image_ms(run, batch, args.repeats),
                         f"largest difference from Keras {gap:.1e}"))
        except ImportError as err:
            rows.append((f"{conv}, ONNX Runtime", float("nan"), f"not installed ({err.name}): pip install onnxruntime tf2onnx"))
        except Exception as err:  # noqa: BLE001
            rows.append((f"{conv}, ONNX Runtime", float("nan"), f"conversion failed: {type(err).__name__}: {err}"[:160]))
    baseline = rows[0][1]
    print(f"\nload average at the end: {load_average()}")
    print("| network, runtime | ms per image | ratio to the baseline | note |")
    print("|---|---|---|---|")
    for name, ms, note in rows:
        label = "baseline" if name == rows[0][0] else f"{ms / baseline:.2f}x"
        print(f"| {name} | {ms:.2f} | {label} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
