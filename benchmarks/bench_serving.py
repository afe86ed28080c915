"""Serving latency and batch-prediction throughput, each against a named baseline.

1. Latency of the REAL scoring server (``mlflow models serve --env-manager local`` on loopback):
   ``--requests`` single-image POSTs to /invocations (a 224x224 cxr-mini PNG, base64), median and
   p95, against the baseline of the same number of GET /ping round trips (HTTP + server overhead
   with no model work). The difference is what decoding, CLAHE, resizing and the forward pass cost.
2. Throughput of ``cxrexp predict`` on the cxr-mini folder (images/s), end to end as a user runs it
   (a subprocess: Python + TensorFlow start-up and model loading included) and in-process (model
   loading included, imports excluded), against the baseline of ``keras.Model.predict`` on ready
   float32 arrays (decode and preprocessing done beforehand, untimed).

Without ``--model`` an untrained ``build_cnn`` with the train defaults (filters 16,32,64,128, dense 64)
at 128 px is logged to a temp store: latency and throughput do not depend on the weights.

    python benchmarks/bench_serving.py                      # cxr-mini beside the project
    python benchmarks/bench_serving.py --model models:/cxr-covid-cnn@champion --requests 100

Only loopback traffic; every loop is bounded in count and time; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cxrexp.tags import CHAMPION

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = PROJECT_ROOT.parent / "shared" / "data" / "cxr-mini"
STARTUP_TIMEOUT = 180.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_default_model(store: Path, image_size: int) -> str:
    """An untrained default-architecture model, logged and registered in a temp store."""
    import mlflow

    from cxrexp.config import ImageSpec, TrainConfig
    from cxrexp.learn.model import build_cnn
    from cxrexp.mlflow_edge import registry
    from cxrexp.mlflow_edge.serving import log_raw_image_model

    cfg = TrainConfig()
    with mlflow.start_run(run_name="bench-serving"):
        info = log_raw_image_model(
            build_cnn(image_size, cfg.filters, cfg.dense, cfg.dropout, cfg.seed),
            ImageSpec(image_size=image_size), 0.5, keras_flavour_name=None,
        )
    registry.register(info.model_uri, "bench-serving", alias=CHAMPION)
    return "models:/bench-serving@champion"


def start_server(model_uri: str, port: int, cwd: Path, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-p", str(port), "-h", "127.0.0.1"],
            cwd=cwd, env=os.environ.copy(), stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop_server(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)  # the server's own group: mlflow and its uvicorn child
            process.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def wait_ready(session, url: str, process: subprocess.Popen, log_path: Path) -> float:
    import requests

    started = time.monotonic()
    while time.monotonic() - started < STARTUP_TIMEOUT:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if session.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - started
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"no answer on {url}/ping within {STARTUP_TIMEOUT:.0f} s")


def timed(session, method: str, url: str, count: int, **kwargs) -> list[float]:
    seconds = []
    for _ in range(count):
        start = time.perf_counter()
        response = session.request(method, url, timeout=60, **kwargs)
        seconds.append(time.perf_counter() - start)
        response.raise_for_status()
    return seconds


def bench_latency(model_uri: str, png: bytes, n_requests: int, workdir: Path) -> dict[str, float]:
    import requests

    port = free_port()
    log_path = workdir / "server.log"
    process = start_server(model_uri, port, workdir, log_path)
    url = f"http://127.0.0.1:{port}"
    body = {"dataframe_records": [{"image": base64.b64encode(png).decode("ascii")}]}
    try:
        with requests.Session() as session:  # keep-alive, as a real client would
            startup = wait_ready(session, url, process, log_path)
            timed(session, "POST", f"{url}/invocations", 5, json=body)  # warm-up (first call builds the graph)
            timed(session, "GET", f"{url}/ping", 5)
            invocations = timed(session, "POST", f"{url}/invocations", n_requests, json=body)
            pings = timed(session, "GET", f"{url}/ping", n_requests)
    finally:
        stop_server(process)
    return {
        "startup_s": startup,
        "invoke_median_ms": 1000 * statistics.median(invocations),
        "invoke_p95_ms": 1000 * percentile(invocations, 95),
        "ping_median_ms": 1000 * statistics.median(pings),
        "ping_p95_ms": 1000 * percentile(pings, 95),
    }


def bench_throughput(model_uri: str, data: Path, batch_size: int, workdir: Path) -> dict[str, float]:
    import numpy as np

    from cxrexp.images.decode import decode_grey
    from cxrexp.images.transforms import prepare
    from cxrexp.mlflow_edge.serving import load_keras_model
    from cxrexp.steps.predict_step import predict_folder

    # End to end, as a user runs it.
    start = time.perf_counter()
    done = subprocess.run(
        ["cxrexp", "predict", "--model", model_uri, str(data), "--output", str(workdir / "cli.csv"),
         "--batch-size", str(batch_size)],
        cwd=workdir, capture_output=True, text=True, timeout=1800,
    )
    cli_seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"cxrexp predict failed ({done.returncode}):\n{done.stderr[-2000:]}")

    # In-process (model loading included).
    start = time.perf_counter()
    result = predict_folder(model_uri, data, workdir / "inproc.csv", batch_size, progress=False)
    inproc_seconds = time.perf_counter() - start
    n_images = len(result.scored)

    # Baseline: Keras on ready arrays (decode + preprocessing untimed).
    keras_model, spec, _ = load_keras_model(model_uri)
    files = sorted(p for p in data.rglob("*.png"))
    arrays = np.stack([prepare(decode_grey(p.read_bytes(), max_pixels=64_000_000), spec) for p in files])
    arrays = arrays.astype(np.float32)[..., None] / 255.0
    keras_model.predict(arrays[:batch_size], batch_size=batch_size, verbose=0)  # warm-up
    start = time.perf_counter()
    keras_model.predict(arrays, batch_size=batch_size, verbose=0)
    keras_seconds = time.perf_counter() - start
    return {
        "n_images": n_images,
        "n_skipped": len(result.skipped),
        "cli_images_per_s": n_images / cli_seconds,
        "cli_seconds": cli_seconds,
        "inproc_images_per_s": n_images / inproc_seconds,
        "keras_images_per_s": len(arrays) / keras_seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model URI (default: an untrained default model in a temp store)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder of X-rays (default: cxr-mini)")
    parser.add_argument("--image-size", type=int, default=128, help="for the default model")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    data = Path(args.data)
    pngs = sorted((data / "COVID" / "images").glob("*.png")) or sorted(data.rglob("*.png"))
    if not pngs:
        print(f"no PNG under {data}: pass --data", file=sys.stderr)
        return 2
    if not 1 <= args.requests <= 10_000:
        print("--requests must be in [1, 10000]", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        workdir = Path(tmp)
        if not args.model:
            import mlflow

            uri = f"sqlite:///{workdir / 'mlflow.db'}"
            os.environ["MLFLOW_TRACKING_URI"] = uri
            mlflow.set_tracking_uri(uri)
            os.chdir(workdir)  # the temp store's artifacts stay in the temp folder
            model_uri = make_default_model(workdir, args.image_size)
            model_name = f"untrained build_cnn (filters 16,32,64,128, dense 64) at {args.image_size} px"
        else:
            model_uri, model_name = args.model, args.model
        print(f"model: {model_name}  ({model_uri})")
        print(f"machine: {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}")

        latency = bench_latency(model_uri, pngs[0].read_bytes(), args.requests, workdir)
        print(f"\nserved latency, {args.requests} single-image requests ({pngs[0].name}, "
              f"{pngs[0].stat().st_size} bytes) on loopback; server ready after {latency['startup_s']:.1f} s")
        print(f"  POST /invocations  median {latency['invoke_median_ms']:7.1f} ms   p95 {latency['invoke_p95_ms']:7.1f} ms")
        print(f"  GET  /ping (base)  median {latency['ping_median_ms']:7.1f} ms   p95 {latency['ping_p95_ms']:7.1f} ms")
        print(f"  ratio invocation/ping (median): {latency['invoke_median_ms'] / latency['ping_median_ms']:.1f}x; "
              f"model work per image ~{latency['invoke_median_ms'] - latency['ping_median_ms']:.1f} ms")

        if not args.skip_throughput:
            throughput = bench_throughput(model_uri, data, args.batch_size, workdir)
            print(f"\nbatch throughput on {data} ({throughput['n_images']} images scored, "
                  f"{throughput['n_skipped']} files skipped), batch size {args.batch_size}")
            print(f"  cxrexp predict (CLI, end to end)  {throughput['cli_images_per_s']:7.1f} images/s "
                  f"({throughput['cli_seconds']:.1f} s)")
            print(f"  predict_folder (in-process)       {throughput['inproc_images_per_s']:7.1f} images/s")
            print(f"  Keras predict on ready arrays     {throughput['keras_images_per_s']:7.1f} images/s (baseline)")
            print(f"  ratio baseline/in-process: {throughput['keras_images_per_s'] / throughput['inproc_images_per_s']:.1f}x "
                  "(the cost of reading, decoding, CLAHE and resizing every file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
