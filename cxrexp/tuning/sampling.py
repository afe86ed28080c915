"""TPE seeded per trial: reproducible alone, distinct across workers and machines.

Why: one ``TPESampler(seed)`` per process makes every process that starts a study at the same moment
draw the same first parameters (TPE's start-up trials are random draws from the seeded RNG), so
two machines repeated each other's trials. A seed derived from the study's seed and the trial's
number (unique in the shared storage) gives every trial its own draws wherever it runs, and the
same study history gives the same draws again: trial 0 of a fresh study draws exactly what
``TPESampler(seed=seed)`` would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState


def trial_seed(seed: int, trial_number: int) -> int:
    """``seed`` itself for trial 0, else a value derived from both (never another trial's)."""
    if trial_number == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(trial_number)]).generate_state(1)[0])


class TrialSeededTPE(BaseSampler):
    """A ``TPESampler`` made afresh for each trial with ``trial_seed(seed, trial.number)``.

    TPE keeps no state between trials besides its RNG (it reads the finished trials from the
    storage), so a fresh instance per trial samples as one long-lived instance would.
    """

    def __init__(self, seed: int, **tpe_options: Any):
        self.seed = int(seed)
        self.tpe_options = tpe_options
        self._per_trial: dict[int, TPESampler] = {}

    def _for(self, trial: FrozenTrial) -> TPESampler:
        sampler = self._per_trial.get(trial.number)
        if sampler is None:
            sampler = TPESampler(seed=trial_seed(self.seed, trial.number), **self.tpe_options)
            self._per_trial[trial.number] = sampler
        return sampler

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: list[float] | None) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        del self._per_trial[trial.number]  # the trial is over: its sampler is not needed again

    def reseed_rng(self) -> None:  # Optuna calls this for n_jobs threads; each trial has its own seed anyway
        pass


__all__ = ["TrialSeededTPE", "trial_seed"]
