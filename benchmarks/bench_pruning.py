"""Median pruning against no pruning: epochs spent and best validation AUC, same seeds, one run.

Run from the project root:

    python benchmarks/bench_pruning.py

Both studies run ``tuning.run_study`` on the same synthetic prepared set (600 images at 64 px by
default, the 80/10/10 split of ``preprocess``), with the same TPE seed, the same number of trials
(12) and the same per-trial budget (up to 8 epochs, early stopping with patience 4): one with
``pruner=median`` (MedianPruner, 2 start-up trials, 2 warm-up epochs), the baseline with
``pruner=none`` (NopPruner). Measured per study: the epochs actually trained (summed over trials,
pruned ones counted up to the epoch they were stopped at), the best validation ROC-AUC (the study's
objective) and the wall time. Target: pruned epochs / unpruned epochs <= 0.60 with a best AUC at
most 0.01 below the baseline's.

The two studies are not trial-for-trial identical after the first pruned trial (TPE sees pruned
trials' values), and the validation split is small (~60 images), so the AUC difference carries
noise of a few hundredths. Everything (prepared data, MLflow store, Optuna DB) lives in a temporary
folder that is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

EPOCH_RATIO_TARGET = 0.60
AUC_TOLERANCE = 0.01


def run_one(pruner: str, data_dir: Path, storage: str, args: argparse.Namespace) -> dict[str, float]:
    """One study; returns epochs, best AUC, trial counts and seconds."""
    import optuna

    from cxrexp import tuning
    from cxrexp.config import TrainConfig
    from cxrexp.store import open_prepared

    dataset = open_prepared(data_dir)
    cfg = TrainConfig(
        data=str(data_dir), dense=(32,), batch_size=32, epochs=args.epochs, patience=args.patience,
        lr_patience=max(args.patience // 2, 0), seed=args.seed, n_trials=args.trials,
        study_name=f"bench-{pruner}", storage=storage, pruner=pruner,
        registered_model_name=f"bench-{pruner}",
    )
    started = time.perf_counter()
    tuning.run_study(cfg, dataset, verbose=0)
    seconds = time.perf_counter() - started
    study = optuna.load_study(study_name=cfg.study_name, storage=tuning.make_storage(storage))
    trials = study.get_trials(deepcopy=False)
    return {
        "epochs": sum(int(t.user_attrs.get(tuning.EPOCHS_ATTR, 0)) for t in trials),
        "best_auc": float(study.best_value),
        "complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pruner", default="median", choices=["median", "percentile", "hyperband"],
                        help="the pruner measured against no pruning (default: the shipped default, median)")
    args = parser.parse_args()

    import mlflow
    import optuna

    from cxrexp.config import PreprocessConfig
    from cxrexp.pipeline import run_preprocess

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # MLflow's artifacts and anything relative land in the temp folder
        os.environ.pop("MLFLOW_RUN_ID", None)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
        mlflow.set_tracking_uri(uri)
        prepared = run_preprocess(
            PreprocessConfig(out_dir=str(root / "prepared"), image_size=args.image_size,
                             synthetic_count=args.images, synthetic_size=128, seed=args.seed),
            progress=False,
        ).dataset
        storage = f"sqlite:///{root / 'optuna.db'}"
        print(f"{args.images} synthetic images at {args.image_size} px, {args.trials} trials of up to "
              f"{args.epochs} epochs (patience {args.patience}), seed {args.seed}", flush=True)
        results = {}
        for pruner in (args.pruner, "none"):
            results[pruner] = run_one(pruner, prepared.root, storage, args)
            r = results[pruner]
            print(f"  pruner={pruner:<6}: {r['epochs']:4d} epochs, best val ROC-AUC {r['best_auc']:.4f}, "
                  f"{r['complete']} complete / {r['pruned']} pruned / {r['failed']} failed, {r['seconds']:.0f} s",
                  flush=True)
        os.chdir(PROJECT_ROOT)

    median, baseline = results[args.pruner], results["none"]
    epoch_ratio = median["epochs"] / max(baseline["epochs"], 1)
    auc_gap = baseline["best_auc"] - median["best_auc"]
    time_ratio = median["seconds"] / max(baseline["seconds"], 1e-9)
    ok = epoch_ratio <= EPOCH_RATIO_TARGET and auc_gap <= AUC_TOLERANCE
    print(f"epochs {args.pruner}/none = {median['epochs']}/{baseline['epochs']} = {epoch_ratio:.2f} "
          f"(target <= {EPOCH_RATIO_TARGET:.2f}); wall time ratio {time_ratio:.2f}")
    print(f"best val ROC-AUC none - {args.pruner} = {auc_gap:+.4f} (target <= {AUC_TOLERANCE})")
    print("PASS" if ok else "MISSED TARGET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
