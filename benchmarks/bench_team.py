"""Team scale: one search on two workers vs one, through a real tracking server; and the server's cost.

Measured in one run, on this machine, against the PostgreSQL on 127.0.0.1:5432:

1. **two workers vs one** (the baseline: one worker doing the same work). A real ``mlflow server``
   (``cxrexp server``'s ``tracking_server.start``) on a fresh PostgreSQL database with proxied
   artifacts, and a fresh Optuna database per case. One ``cxrexp train --n-trials N`` process, then
   two started at once on another study of the same N trials (as two machines would). Wall time from
   the first launch to the last exit, start-up included (each process imports TensorFlow). Each
   process is left TensorFlow's default threads, as a process on a machine of its own would be: on
   these 2 cores the two workers share them.
2. **tracking through the server vs a local SQLite store**: the same one-worker search with MLflow on
   ``sqlite:///`` and Optuna on ``sqlite:///`` in a temporary folder; the difference per trial.

Every trial is the same small model (32 px, filters 8,16, dense 8, ``--epochs`` epochs, pruner none)
on ``--count`` synthetic images, so the trials differ only in what TPE draws.

    python benchmarks/bench_team.py                 # N=8 trials, 2 epochs, 400 images
    python benchmarks/bench_team.py --trials 12 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import PROJECT_ROOT, load_average  # noqa: E402

ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, PYTHONPATH=str(PROJECT_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return env


def prepare(folder: Path, env: dict[str, str], count: int) -> str:
    """A synthetic prepared dataset in ``folder``; returns its preprocess run id."""
    out = subprocess.run([sys.executable, "-m", "cxrexp.cli", "preprocess", "--synthetic-count", str(count),
                          "--synthetic-size", "64", "--image-size", "32", "--out-dir", str(folder / "prepared"),
                           "--lungs", "none"],  # whole images: the server's cost per trial is measured
                         cwd=folder, env=env, capture_output=True, text=True, check=True)
    return next(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("preprocess run id:"))


def search(folder: Path, env: dict[str, str], data: str, storage: str, study: str, trials: int, epochs: int,
           workers: int) -> float:
    """Wall seconds for ``workers`` processes started at once to finish one study of ``trials`` trials."""
    command = [sys.executable, "-m", "cxrexp.cli", "train", "--data", data, "--n-trials", str(trials),
               "--storage", storage, "--study-name", study, "--pruner", "none", "--filters", "8,16",
               "--dense", "8", "--epochs", str(epochs), "--patience", str(epochs), "--lr-patience", "0",
               "--registered-model-name", f"bench-{study}"]
    started = time.perf_counter()
    procs = [subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(workers)]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"a worker of study {study} exited with {proc.returncode}:\n{err[-3000:]}")
    return time.perf_counter() - started


def finished_trials(storage: str, study: str) -> int:
    import optuna

    from cxrexp.tuning import count_done, make_storage

    return count_done(optuna.load_study(study_name=study, storage=make_storage(storage)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--count", type=int, default=400, help="synthetic images")
    args = parser.parse_args()

    import sqlalchemy

    from cxrexp.config import ServerConfig
    from cxrexp.mlflow_edge import tracking_server

    admin = sqlalchemy.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text("select 1"))
    except Exception as err:  # noqa: BLE001
        print(f"PostgreSQL not reachable at 127.0.0.1:5432 ({type(err).__name__}): start it to run this benchmark",
              file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    databases = {role: f"bench_team_{role}_{tag}" for role in ("mlflow", "one", "two")}
    with admin.connect() as connection:
        for name in databases.values():
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    pg = "postgresql://postgres@127.0.0.1:5432/"
    print(f"load average before: {load_average()}; {os.cpu_count()} cores; {args.trials} trials of {args.epochs} "
          f"epochs on {args.count} synthetic 32 px images")
    with tempfile.TemporaryDirectory(prefix="bench-team-") as tmp:
        root = Path(tmp)
        cfg = ServerConfig(backend_store_uri=f"postgresql+psycopg2://postgres@127.0.0.1:5432/{databases['mlflow']}",
                           artifacts_destination=str(root / "artifacts"), port=free_port())
        server = tracking_server.start(cfg, root / "server.log")
        try:
            served = clean_env(tracking_server.tracking_uri(cfg))
            data = prepare(root, served, args.count)
            one = search(root, served, data, pg + databases["one"], "one", args.trials, args.epochs, workers=1)
            two = search(root, served, data, pg + databases["two"], "two", args.trials, args.epochs, workers=2)
            counts = (finished_trials(pg + databases["one"], "one"), finished_trials(pg + databases["two"], "two"))
        finally:
            tracking_server.stop(server)
        local_root = root / "local"
        local_root.mkdir()
        local = clean_env(f"sqlite:///{local_root / 'mlflow.db'}")
        local_data = prepare(local_root, local, args.count)
        alone = search(local_root, local, local_data, f"sqlite:///{local_root / 'optuna.db'}", "local", args.trials,
                       args.epochs, workers=1)
    with admin.connect() as connection:
        for name in databases.values():
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()

    print("\n| case | finished trials | wall s | per trial s |\n|---|---|---|---|")
    print(f"| one worker, through the server (baseline) | {counts[0]} | {one:.1f} | {one / args.trials:.2f} |")
    print(f"| two workers at once, through the server | {counts[1]} | {two:.1f} | {two / args.trials:.2f} |")
    print(f"| one worker, local SQLite (MLflow and Optuna) | {args.trials} | {alone:.1f} | {alone / args.trials:.2f} |")
    print(f"\ntwo workers vs one: {one / two:.2f}x (target >= 1.6x)")
    print(f"tracking through the server vs local SQLite: {(one - alone) / args.trials:+.2f} s per trial "
          f"({one / alone:.2f}x the local wall time)")
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
