"""Replay a finished no-pruning study's learning curves through pruners: epochs saved, winner kept?

Run from the project root, on a folder kept by ``bench_pruning.py --workdir DIR`` (its no-pruning
study ``bench-<seed>-none`` in DIR/seed-<seed>/optuna.db):

    python benchmarks/bench_pruning.py --trials 30 --epochs 20 --seeds 42 1 7 --pruners --workdir /tmp/bp
    python benchmarks/replay_pruning.py --workdir /tmp/bp --seeds 42 1 7 --epochs 20

Each pruner gets a fresh in-memory Optuna study. The recorded trials are fed to it in their original
order, epoch by epoch (``trial.report`` then ``trial.should_prune``, as ``tuning.PruningCallback``
does); a trial the pruner stops is counted up to that epoch and told PRUNED, any other trial is
counted in full and told its recorded value. Measured: epochs trained against the study's, the best
value kept against the study's best, and, when ``fresh_auc.json`` (trial number -> ROC-AUC of that
trial's model on fresh synthetic images, written by ``--score-fresh``) exists, the fresh-set AUC of
the model the pruned study would have picked against the one the study picked.

A replay is not a new study: after the first pruned trial, TPE would have proposed other trials. It
shows what each rule does to the same curves, cheaply and deterministically (except ``hyperband``,
whose bracket of a trial depends on the study name); ``bench_pruning.py`` measures the real thing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import optuna  # noqa: E402
from bench_pruning import AUC_TOLERANCE, EPOCH_RATIO_TARGET  # noqa: E402

from cxrexp.tags import MODEL_URI_TAG
from cxrexp.tuning import RunningAverageMedianPruner  # noqa: E402

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


class ReferenceMedianPruner(RunningAverageMedianPruner):
    """Median stopping with a choice of reference, to test why Optuna's ``MedianPruner`` loses winners.

    ``MedianPruner`` compares a trial's best value so far with the median of the COMPLETE trials'
    values at the same epoch. Once pruning starts, only trials that survived it complete, so the
    reference drifts up (a survivorship ratchet). ``with_pruned`` adds pruned trials' values at the
    epochs they reached; ``running_average`` compares with the median of the reference trials'
    running averages up to that epoch (as the shipped ``median-average`` does); ``keep`` is the
    share of the reference a trial must not fall below (50: the median).
    """

    def __init__(self, *, with_pruned: bool, running_average: bool, keep: float = 50.0):
        super().__init__(n_startup_trials=2, n_warmup_steps=2)
        self.reference_states = (COMPLETE, PRUNED) if with_pruned else (COMPLETE,)
        self.running_average, self.keep = running_average, keep

    def reference_value(self, trial: optuna.trial.FrozenTrial, step: int) -> float:
        return super().reference_value(trial, step) if self.running_average else trial.intermediate_values[step]

    def threshold(self, reference: list[float]) -> float:
        return float(np.percentile(reference, 100.0 - self.keep))


def candidates(max_epochs: int) -> dict[str, optuna.pruners.BasePruner]:
    """The shipped pruners (``make_pruner``) and the variants the docs report on."""
    from cxrexp.config import PRUNERS
    from cxrexp.tuning import make_pruner

    pruners = {name: make_pruner(name, max_epochs) for name in PRUNERS if name != "none"}
    median = optuna.pruners.MedianPruner
    pruners.update({
        "median, 4 warm-up epochs": median(n_startup_trials=2, n_warmup_steps=4),
        "median, 6 warm-up epochs": median(n_startup_trials=2, n_warmup_steps=6),
        "median, 5 start-up trials": median(n_startup_trials=5, n_warmup_steps=2),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        pruners["median, patience 1"] = optuna.pruners.PatientPruner(
            median(n_startup_trials=2, n_warmup_steps=2), patience=1)
    pruners.update({
        "median incl. pruned": ReferenceMedianPruner(with_pruned=True, running_average=False),
        "keep top 60% incl. pruned": ReferenceMedianPruner(with_pruned=True, running_average=False, keep=60.0),
        "running average incl. pruned": ReferenceMedianPruner(with_pruned=True, running_average=True),
    })
    return pruners


def epochs_of(trial: optuna.trial.FrozenTrial) -> int:
    from cxrexp.tuning import EPOCHS_ATTR

    return int(trial.user_attrs.get(EPOCHS_ATTR, len(trial.intermediate_values)))


def replay(trials: list[optuna.trial.FrozenTrial], pruner: optuna.pruners.BasePruner) -> tuple[int, float, int | None]:
    """``(epochs, best kept value, number of the trial that value came from)`` under ``pruner``."""
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    epochs, best, pick = 0, -math.inf, None
    for recorded in trials:
        trial = study.ask()
        for step in sorted(recorded.intermediate_values):
            trial.report(recorded.intermediate_values[step], step)
            if trial.should_prune():
                epochs += step + 1
                study.tell(trial, state=PRUNED)
                break
        else:
            epochs += epochs_of(recorded)
            study.tell(trial, recorded.value)
            if recorded.value > best:
                best, pick = recorded.value, recorded.number
    return epochs, best, pick


def score_fresh(root: Path, seed: int, study: optuna.Study, images: int, image_size: int) -> dict[str, float]:
    """Every COMPLETE trial's model scored on ``images`` fresh synthetic images (``fresh_auc.json``)."""
    import mlflow
    from bench_pruning import fresh_probabilities, fresh_set

    from cxrexp.evaluation.metrics import roc_auc
    from cxrexp.tuning import RUN_ID_ATTR

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    fresh = fresh_set(root, seed, argparse.Namespace(fresh=images, image_size=image_size))
    scores = {}
    for trial in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        model_uri = mlflow.get_run(trial.user_attrs[RUN_ID_ATTR]).data.tags[MODEL_URI_TAG]
        scores[str(trial.number)] = roc_auc(fresh[2], fresh_probabilities(model_uri, fresh))
    (root / "fresh_auc.json").write_text(json.dumps(scores, indent=1))
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="a folder kept by bench_pruning.py --workdir")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 7])
    parser.add_argument("--epochs", type=int, default=20, help="the studies' per-trial epoch budget")
    parser.add_argument("--score-fresh", type=int, default=0, metavar="N",
                        help="first score every trial's model on N fresh synthetic images (fresh_auc.json)")
    parser.add_argument("--image-size", type=int, default=64, help="the studies' image size (for --score-fresh)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)

    rows: dict[str, list[tuple[int, int, float, float]]] = {}
    found = [(args.workdir.resolve() / f"seed-{seed}", seed) for seed in args.seeds]
    missing = [str(root / "optuna.db") for root, seed in found if not (root / "optuna.db").exists()]
    if missing:
        print(f"no no-pruning study (bench_pruning.py --workdir) in {', '.join(missing)}", file=sys.stderr)
        return 2
    for root, seed in found:
        study = optuna.load_study(study_name=f"bench-{seed}-none", storage=f"sqlite:///{root / 'optuna.db'}")
        trials = sorted(study.get_trials(deepcopy=False, states=(COMPLETE,)), key=lambda t: t.number)
        if args.score_fresh:
            fresh = score_fresh(root, seed, study, args.score_fresh, args.image_size)
        else:
            fresh_path = root / "fresh_auc.json"
            fresh = json.loads(fresh_path.read_text()) if fresh_path.exists() else {}
        base_epochs = sum(epochs_of(t) for t in trials)
        base = max(trials, key=lambda t: t.value)
        print(f"seed {seed}: {len(trials)} trials, {base_epochs} epochs, best validation AUC {base.value:.4f} "
              f"(trial {base.number}" + (f", {fresh[str(base.number)]:.4f} on fresh images)" if fresh else ")"))
        for name, pruner in candidates(args.epochs).items():
            epochs, best, pick = replay(trials, pruner)
            fresh_gap = fresh[str(base.number)] - fresh[str(pick)] if fresh else math.nan
            rows.setdefault(name, []).append((epochs, base_epochs, base.value - best, fresh_gap))
    print()
    width = max(map(len, rows))
    for name, r in rows.items():
        ratio = sum(x[0] for x in r) / sum(x[1] for x in r)
        ok = ratio <= EPOCH_RATIO_TARGET and max(x[2] for x in r) <= AUC_TOLERANCE
        print(f"{name:<{width}}  epochs {ratio:.2f} (" + " ".join(f"{x[0] / x[1]:.2f}" for x in r)
              + ")  best val AUC lost " + " ".join(f"{x[2]:+.4f}" for x in r)
              + ("" if any(math.isnan(x[3]) for x in r) else "  on fresh images " + " ".join(f"{x[3]:+.4f}" for x in r))
              + ("  PASS" if ok else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
