"""The Optuna edge: search space, pruning callback, and studies as parent/child MLflow runs.

Pure pieces are table-driven; the studies train real (tiny: 48 px, 1-2 epochs) models. One MLflow store
(``shared_store``: creating one costs seconds of migrations) and one 3-trial study (``shared_study``) are
shared by the module; the other studies have their own names and registered models, each as small as its
point allows.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from cxrexp import tuning
from cxrexp.config import CLASS_WEIGHT_SCHEMES, TrainConfig
from cxrexp.evaluation import metrics
from cxrexp.learn.training import TrainingDiverged
from cxrexp.mlflow_edge import training_run
from cxrexp.tags import (
    CHALLENGER,
    EPOCHS_ATTR,
    FAIL_REASON_TAG,
    MODEL_URI_TAG,
    RUN_ID_ATTR,
    STATE_TAG,
    STEP_TAG,
    STUDY_NAME_TAG,
    TRIAL_NUMBER_TAG,
)

from .conftest import postgres_or_skip

optuna.logging.set_verbosity(optuna.logging.WARNING)

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
# Smallest settings that still train: 1 epoch, no LR plateau before early stopping could act.
TINY = TrainConfig(dense=(8,), batch_size=32, epochs=1, patience=1, lr_patience=0, seed=7, n_trials=1)


def study_cfg(**overrides) -> TrainConfig:
    return replace(TINY, **overrides)


def children(parent_id: str) -> list:
    """The parent's child runs, sorted by name."""
    client = MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(runs, key=lambda r: r.info.run_name)


def running_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, filter_string="attributes.status = 'RUNNING'",
                              output_format="list")


def load(cfg: TrainConfig, url: str = "") -> optuna.Study:
    storage = tuning.make_storage(url or tuning.storage_url(cfg))
    return optuna.load_study(study_name=cfg.study_name, storage=storage)


# --------------------------------------------------------------------------- search space (pure)


@pytest.mark.parametrize(
    "image_size, widths, depths",
    [
        (16, (8, 16, 32), (3, 4)),  # 16 px survives 4 poolings
        (48, (8, 16, 32), (3, 5)),
        (64, (8, 16, 32), (3, 5)),
        (128, (16, 32, 64), (3, 5)),
        (299, (16, 32, 64), (3, 5)),
    ],
)
def test_space_bounds_follow_image_size(image_size, widths, depths):
    assert tuning.base_widths(image_size) == widths
    assert tuning.depth_range(image_size) == depths


@pytest.mark.parametrize(
    "base_width, n_blocks, expected",
    [(16, 4, (16, 32, 64, 128)), (8, 3, (8, 16, 32)), (64, 5, (64, 128, 256, 256, 256))],
)
def test_doubling_filters(base_width, n_blocks, expected):
    assert tuning.doubling_filters(base_width, n_blocks) == expected


@pytest.mark.parametrize(
    "params, filters",
    [
        ({"base_width": 16, "n_blocks": 4, "dropout": 0.3, "class_weight": "effective", "learning_rate": 5e-4},
         (16, 32, 64, 128)),
        ({"base_width": 8, "n_blocks": 3, "dropout": 0.0, "class_weight": "none", "learning_rate": 1e-4},
         (8, 16, 32)),
    ],
)
def test_suggest_config_replaces_only_searched_fields(params, filters):
    base = TrainConfig(epochs=9, batch_size=12, dense=(24,), seed=3)
    cfg = tuning.suggest_config(optuna.trial.FixedTrial(params), base, image_size=48)
    assert cfg.filters == filters
    assert (cfg.dropout, cfg.class_weight, cfg.learning_rate) == (
        params["dropout"], params["class_weight"], params["learning_rate"])
    assert (cfg.epochs, cfg.batch_size, cfg.dense, cfg.seed) == (9, 12, (24,), 3)


def test_sampled_configs_stay_inside_the_space():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen_blocks = set()
    for _ in range(40):
        cfg = tuning.suggest_config(study.ask(), TINY, image_size=16)
        seen_blocks.add(len(cfg.filters))
        assert cfg.filters[0] in (8, 16, 32)
        assert all(b == min(2 * a, tuning.MAX_FILTERS) for a, b in zip(cfg.filters, cfg.filters[1:]))
        assert 0.0 <= cfg.dropout <= 0.5 and 1e-4 <= cfg.learning_rate <= 3e-3
        assert cfg.class_weight in CLASS_WEIGHT_SCHEMES
    assert seen_blocks == {3, 4}  # capped at 4 blocks for 16 px


@pytest.mark.parametrize(
    "name, kind",
    [("median", optuna.pruners.MedianPruner), ("median-average", tuning.RunningAverageMedianPruner),
     ("percentile", optuna.pruners.PercentilePruner),
     ("halving", optuna.pruners.SuccessiveHalvingPruner), ("hyperband", optuna.pruners.HyperbandPruner),
     ("none", optuna.pruners.NopPruner)],
)
def test_make_pruner(name, kind):
    assert isinstance(tuning.make_pruner(name, max_epochs=8), kind)


# Eight finished trials whose validation AUC at step 2 is 0.1 ... 0.8 (after 0.5, 0.5): median 0.45,
# lowest quarter 0.275; their running averages at step 2, (1.0 + v) / 3, have median 0.4833.
REFERENCE_AT_STEP_2 = [round(0.1 * k, 1) for k in range(1, 9)]


@pytest.mark.parametrize(
    "name, curve, pruned",
    [
        ("median", [0.1, 0.1, 0.40], True),
        ("median", [0.1, 0.1, 0.50], False),
        ("median", [0.6, 0.1, 0.10], False),  # the trial's best so far counts, not its last value
        ("median", [0.0, 0.0], False),  # warm-up: nothing pruned before step 2
        ("percentile", [0.1, 0.1, 0.25], True),
        ("percentile", [0.1, 0.1, 0.30], False),
        ("percentile", [0.1, 0.1, 0.40], False),  # below the median, but not in the lowest quarter
        ("percentile", [0.0, 0.0], False),
        ("median-average", [0.1, 0.1, 0.47], True),  # above the values' median, below the averages'
        ("median-average", [0.1, 0.1, 0.49], False),
        ("median-average", [0.6, 0.1, 0.10], False),
        ("median-average", [0.0, 0.0], False),
    ],
)
def test_median_and_percentile_pruners_compare_with_finished_trials_at_the_same_epoch(name, curve, pruned):
    study = optuna.create_study(direction="maximize", pruner=tuning.make_pruner(name, max_epochs=8))
    for value in REFERENCE_AT_STEP_2:
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=value, intermediate_values={0: 0.5, 1: 0.5, 2: value},
        ))
    trial = study.ask()
    for step, value in enumerate(curve):
        trial.report(value, step)
    assert bool(trial.should_prune()) is pruned


# Four finished trials climbing 0.5 -> 0.7 -> 0.9: value 0.9 at step 2, running average 0.7.
# A fifth stopped (early stopping) after step 1, so it is no reference at step 2.
CLIMBING = [[0.5, 0.7, 0.9]] * 4 + [[0.99, 0.99]]


@pytest.mark.parametrize(
    "curve, median_prunes, average_prunes",
    [
        ([0.5, 0.6, 0.8], True, False),  # a slow starter: below where the others are, above their average
        ([0.5, 0.6, 0.65], True, True),
        ([0.75, 0.6, 0.6], True, False),  # best so far counts
        ([0.0, 0.0], False, False),  # warm-up
    ],
)
def test_median_average_pruner_judges_slow_starters_against_running_averages(curve, median_prunes, average_prunes):
    decisions = []
    for name in ("median", "median-average"):
        study = optuna.create_study(direction="maximize", pruner=tuning.make_pruner(name, max_epochs=8))
        for reference in CLIMBING:
            study.add_trial(optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, value=max(reference), intermediate_values=dict(enumerate(reference)),
            ))
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        decisions.append(bool(trial.should_prune()))
    assert decisions == [median_prunes, average_prunes]


@pytest.mark.parametrize("finished", [0, 1])
def test_median_average_pruner_waits_for_two_finished_trials(finished):
    study = optuna.create_study(direction="maximize", pruner=tuning.make_pruner("median-average", max_epochs=8))
    for _ in range(finished):
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE, value=0.9, intermediate_values={0: 0.9, 1: 0.9, 2: 0.9}))
    trial = study.ask()
    for step in range(3):
        trial.report(0.1, step)
    assert not trial.should_prune()


@pytest.mark.parametrize(
    "curves, expected",
    [
        # Rung 0 is step 1 (after epoch 2). A trial reaching it goes on only as the best of the first
        # three there, later only in the top quarter: of 4 the best, of 8 the best two (0.89 >= 0.88).
        ([[0.6, 0.8], [0.6, 0.7], [0.6, 0.9]], [False, True, False]),
        ([[0.5, 0.9], [0.5, 0.8], [0.5, 0.85], [0.5, 0.95]], [False, True, True, False]),
        ([[0.5, 0.9], [0.5, 0.8], [0.5, 0.85], [0.5, 0.7], [0.5, 0.88], [0.5, 0.6], [0.5, 0.5], [0.5, 0.89]],
         [False, True, True, True, True, True, True, False]),
        # Before the rung nothing is pruned, however bad.
        ([[0.9], [0.1]], [False, False]),
    ],
)
def test_halving_pruner_keeps_the_top_quarter_at_each_rung(curves, expected):
    study = optuna.create_study(direction="maximize", pruner=tuning.make_pruner("halving", max_epochs=8))
    decisions = []
    for curve in curves:
        trial = study.ask()
        for step, value in enumerate(curve):
            trial.report(value, step)
        decisions.append(trial.should_prune())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED if decisions[-1] else optuna.trial.TrialState.COMPLETE,
                   values=None if decisions[-1] else curve[-1])
    assert decisions == expected


def test_make_pruner_rejects_unknown_name():
    with pytest.raises(ValueError, match="'sometimes'"):
        tuning.make_pruner("sometimes", 8)


def test_trials_are_seeded_by_their_number_reproducible_alone_and_distinct_across_machines():
    """Two processes that start one study together used to draw the same first parameters."""
    from cxrexp.tuning.sampling import TrialSeededTPE, trial_seed

    def objective(trial):
        return trial.suggest_float("x", 0, 1) + trial.suggest_categorical("c", [1, 2, 3])

    assert trial_seed(42, 0) == 42 and len({trial_seed(42, n) for n in range(50)}) == 50
    first = optuna.create_study(sampler=TrialSeededTPE(42))
    first.optimize(objective, n_trials=12)  # past TPE's 10 random start-up trials
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=42))
    plain.optimize(objective, n_trials=1)
    assert first.trials[0].params == plain.trials[0].params  # a fresh study alone: as TPESampler(seed)
    again = optuna.create_study(sampler=TrialSeededTPE(42))
    again.optimize(objective, n_trials=12)
    assert [t.params for t in again.trials] == [t.params for t in first.trials]  # reproducible
    # Two "machines" on one storage, each with its own sampler, interleaving their trials.
    storage = optuna.storages.InMemoryStorage()
    a = optuna.create_study(storage=storage, study_name="shared", sampler=TrialSeededTPE(42))
    b = optuna.load_study(storage=storage, study_name="shared", sampler=TrialSeededTPE(42))
    for _ in range(3):
        a.optimize(objective, n_trials=1)
        b.optimize(objective, n_trials=1)
    assert len({tuple(sorted(t.params.items())) for t in a.trials}) == 6


def test_redact_hides_the_password():
    assert tuning.redact("postgresql://user:secret@db:5432/x") == "postgresql://user:***@db:5432/x"


@pytest.mark.parametrize("url", ["nosuchdb://host/x", "postgresql://nobody@127.0.0.1:1/x"])
def test_unusable_storage_is_a_user_error_naming_the_url(url):
    with pytest.raises(tuning.StorageError, match="cannot open the Optuna storage") as info:
        tuning.make_storage(url)
    assert url.split("//")[1].split("/")[0] in str(info.value)


def test_trial_budget_hands_out_exactly_n_slots():
    import multiprocessing

    budget = tuning.TrialBudget(multiprocessing.Value("i", 2))
    assert [budget.claim() for _ in range(4)] == [True, True, False, False]


class FakeTrial:
    """Records reports; says "prune" from step ``prune_from`` on."""

    def __init__(self, prune_from: int | None):
        self.prune_from = prune_from
        self.reports: list[tuple[int, float]] = []

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune_from is not None and bool(self.reports) and self.reports[-1][0] >= self.prune_from


@pytest.mark.parametrize(
    "val_aucs, prune_from, reported_steps, pruned_after",
    [
        ([0.6, 0.7, 0.8], None, [0, 1, 2], None),
        ([0.6, 0.7, 0.8], 1, [0, 1], 2),  # raises at the end of epoch 2 (step 1)
        ([math.nan, 0.7, 0.8], 0, [1], 2),  # NaN is not reported, so it cannot trigger pruning
    ],
)
def test_pruning_callback(val_aucs, prune_from, reported_steps, pruned_after):
    trial = FakeTrial(prune_from)
    callback = tuning.PruningCallback(trial)
    callback.on_train_begin()
    pruned_at = None
    for epoch, value in enumerate(val_aucs):
        try:
            callback.on_epoch_end(epoch, {"val_auc": value, "loss": 0.5})
        except optuna.TrialPruned:
            pruned_at = epoch + 1
            break
    assert [step for step, _ in trial.reports] == reported_steps
    assert pruned_at == pruned_after
    assert callback.epochs_seen == (pruned_after or len(val_aucs))


# --------------------------------------------------------------------------- one shared study


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("study-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.chdir(root)
        yield root, uri


@pytest.fixture()
def in_shared_store(shared_store):
    root, uri = shared_store
    mlflow.set_tracking_uri(uri)
    yield root
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def shared_study(shared_store, synthetic_prepared):
    """A 3-trial study (2 epochs: inside the median pruner's 2 warm-up steps, so none is pruned)."""
    root, uri = shared_store
    mlflow.set_tracking_uri(uri)
    cfg = study_cfg(n_trials=3, epochs=2, patience=2, lr_patience=1, study_name="shared",
                    storage=f"sqlite:///{root / 'optuna.db'}")
    parent_id = tuning.run_study(cfg, synthetic_prepared, verbose=0)
    mlflow.set_tracking_uri(None)
    return cfg, parent_id


def test_study_is_a_parent_run_with_one_child_per_trial(shared_study, in_shared_store):
    cfg, parent_id = shared_study
    study = load(cfg)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    parent = MlflowClient().get_run(parent_id)
    assert parent.info.run_name == "study shared 48px" and parent.info.status == "FINISHED"
    assert parent.data.tags[STEP_TAG] == "train"
    assert parent.data.params["n_trials"] == "3" and parent.data.params["epochs"] == "2"

    kids = children(parent_id)
    assert [r.info.run_name for r in kids] == ["trial-000", "trial-001", "trial-002"]
    for run, trial in zip(kids, study.trials):
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert (tags[STEP_TAG], tags[STATE_TAG]) == ("trial", "COMPLETE")
        assert (tags[TRIAL_NUMBER_TAG], tags[STUDY_NAME_TAG]) == (str(trial.number), "shared")
        assert trial.user_attrs[RUN_ID_ATTR] == run.info.run_id
        expected = tuning.doubling_filters(trial.params["base_width"], trial.params["n_blocks"])
        assert run.data.params["filters"] == ",".join(map(str, expected))
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"])
        assert len(MlflowClient().get_metric_history(run.info.run_id, "val_auc")) == 2  # per epoch
        assert run.data.metrics["objective_value"] == pytest.approx(trial.value)


def test_parent_logs_best_trial_table_and_figures(shared_study, in_shared_store):
    cfg, parent_id = shared_study
    study = load(cfg)
    parent = MlflowClient().get_run(parent_id)
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    assert parent.data.tags["optuna.best.n_blocks"] == str(study.best_params["n_blocks"])  # a tag: it may change
    assert parent.data.tags["optuna.best_trial_number"] == str(study.best_trial.number)
    artifacts = mlflow.artifacts.download_artifacts(run_id=parent_id)
    table = (Path(artifacts) / "study" / "trials.csv").read_text().splitlines()
    assert len(table) == 1 + 3 and "user_attrs_mlflow_run_id" in table[0]
    assert (Path(artifacts) / "figures" / "optimization_history.png").stat().st_size > 1000
    assert (Path(artifacts) / "figures" / "param_importances.png").stat().st_size > 1000


def test_parent_says_how_sharp_the_validation_split_is(shared_study, in_shared_store, synthetic_prepared):
    cfg, parent_id = shared_study
    _, labels = synthetic_prepared.split_rows("val")
    n_positive, n_negative = int(labels.sum()), int(labels.size - labels.sum())
    parent = MlflowClient().get_run(parent_id)
    assert (parent.data.params["val_positives"], parent.data.params["val_negatives"]) == (
        str(n_positive), str(n_negative))
    assert parent.data.metrics["val_auc_se_at_0_9"] == pytest.approx(
        metrics.auc_standard_error(0.9, n_positive, n_negative))
    assert parent.data.metrics["best_value_se"] == pytest.approx(
        metrics.auc_standard_error(load(cfg).best_value, n_positive, n_negative))


@pytest.mark.parametrize(
    "n_positive, n_negative, says",
    [
        (31, 89, "+-0.038"),  # 10% of the default 1,200 synthetic images: told
        (63, 177, "+-0.027"),  # 10% of 2,400
        (314, 886, None),  # the pruning benchmark's 1,200-image validation split: SE 0.012
        (0, 120, None),  # no AUC at all: training reports that itself
    ],
)
def test_validation_noise_note(n_positive, n_negative, says):
    note = tuning.validation_noise_note(n_positive, n_negative)
    if says is None:
        assert note is None
    else:
        assert says in note and f"{n_positive} positive / {n_negative} negative" in note and "val_frac" in note


def test_best_trial_model_is_registered_as_challenger(shared_study, in_shared_store):
    cfg, parent_id = shared_study
    study = load(cfg)
    version = MlflowClient().get_model_version_by_alias(cfg.registered_model_name, CHALLENGER)
    best_run_id = study.best_trial.user_attrs[RUN_ID_ATTR]
    assert version.tags["train_run_id"] == best_run_id
    assert version.tags[STUDY_NAME_TAG] == "shared"
    assert version.tags[TRIAL_NUMBER_TAG] == str(study.best_trial.number)
    assert float(version.tags["objective_value"]) == pytest.approx(study.best_value, abs=1e-6)
    model_uri = MlflowClient().get_run(parent_id).data.tags[MODEL_URI_TAG]
    assert model_uri == MlflowClient().get_run(best_run_id).data.tags[MODEL_URI_TAG]
    assert version.source == model_uri or version.model_id in model_uri


def test_rerun_resumes_instead_of_redoing_under_the_studys_one_parent(shared_study, in_shared_store, synthetic_prepared):
    from cxrexp.tags import INVOCATION_TAG, PARENT_RUN_ATTR, STUDY_RUN_TAG

    cfg, first_parent = shared_study
    client = MlflowClient()
    versions_before = len(client.search_model_versions(f"name = '{cfg.registered_model_name}'"))

    again = tuning.run_study(cfg, synthetic_prepared, verbose=0)  # asks for 3 again: nothing to do
    assert again != first_parent and children(again) == []
    assert len(load(cfg).trials) == 3
    joined = client.get_run(again)
    assert joined.data.tags["optuna.trials_done_before"] == "3"
    assert joined.data.tags[STUDY_RUN_TAG] == first_parent and joined.info.run_name == "study shared 48px (joined)"
    assert joined.data.tags[MODEL_URI_TAG] == client.get_run(first_parent).data.tags[MODEL_URI_TAG]  # main reads it
    assert len(client.search_model_versions(f"name = '{cfg.registered_model_name}'")) == versions_before

    more = tuning.run_study(replace(cfg, n_trials=4), synthetic_prepared, verbose=0)
    study = load(cfg)
    assert study.user_attrs[PARENT_RUN_ATTR] == first_parent
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert children(more) == []
    kids = children(first_parent)  # the study's trials under its one parent, whichever invocation ran them
    assert [r.info.run_name for r in kids] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert kids[3].data.tags[INVOCATION_TAG] == more and kids[0].data.tags[INVOCATION_TAG] == first_parent
    assert client.get_run(first_parent).data.metrics["n_trials_complete"] == 4  # its summary refreshed
    assert study.trials[3].params != study.trials[0].params  # the resumed sampler does not replay trial 0
    assert study.trials[3].user_attrs["worker"].endswith(f":{os.getpid()}")


def _frozen(number: int, state: TrialState) -> optuna.trial.FrozenTrial:
    return optuna.trial.FrozenTrial(number=number, state=state, value=None, datetime_start=None,
                                    datetime_complete=None, params={}, distributions={}, user_attrs={},
                                    system_attrs={}, intermediate_values={}, trial_id=number)


C, P, R, W, F = TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL


@pytest.mark.parametrize(
    "states, number, n_trials, surplus",
    [
        ([], 0, 1, False),  # a fresh study's first trial
        ([C, C], 2, 3, False),
        ([C, C, C], 3, 3, True),  # done already
        ([C, R], 2, 2, True),  # another machine runs the last one
        ([C, W], 2, 2, True),  # a queued retry holds the last place
        ([C, F], 2, 2, False),  # a failed trial holds none
        ([C, P, R, C], 2, 3, False),  # only the trials numbered below count: trial 2 came before 3
        ([C, P, R, C], 4, 3, True),
    ],
)
def test_a_trial_beyond_the_studys_n_trials_is_surplus_on_every_machine(states, number, n_trials, surplus):
    from cxrexp.tuning.trial import is_surplus

    trials = [_frozen(i, state) for i, state in enumerate(states)]
    assert is_surplus(trials, number, n_trials) == surplus


def test_a_second_machine_does_not_overshoot_n_trials(shared_study, in_shared_store, synthetic_prepared, tmp_path):
    """A copy of the shared study plus a trial another machine is running: asked for one more than it
    has done, this invocation's trial would exceed n_trials, so it is not run (FAIL, surplus, no run)."""
    from cxrexp.tags import SURPLUS_ATTR

    cfg, _ = shared_study
    done = len(load(cfg).trials)  # 3, or 4 once test_rerun_resumes_instead_of_redoing_under_the_studys_one_parent has run
    copy = replace(cfg, study_name="copied", storage=f"sqlite:///{tmp_path / 'copy.db'}", n_trials=done + 1,
                   registered_model_name="m-copied")
    optuna.copy_study(from_study_name=cfg.study_name, from_storage=tuning.make_storage(tuning.storage_url(cfg)),
                      to_storage=tuning.make_storage(copy.storage), to_study_name=copy.study_name)
    elsewhere = load(copy, copy.storage)
    elsewhere.ask()  # RUNNING on "another machine": it holds the last place
    parent = tuning.run_study(copy, synthetic_prepared, verbose=0)
    study = load(copy, copy.storage)
    assert [t.state for t in study.trials] == [C] * done + [R, F]
    assert study.trials[-1].user_attrs[SURPLUS_ATTR] is True
    assert children(parent) == []  # no run was started for it
    assert tuning.count_done(study) == done


class _FakeStudy:
    """The states of a study's trials, one list per poll: what another machine does in between."""

    study_name = "fake"

    def __init__(self, polls: list[list[TrialState]], silent: bool = False):
        self.polls = polls
        self.seen = 0
        self.silent = silent  # trials without a heartbeat

    def get_trials(self, deepcopy=False):
        states = self.polls[min(self.seen, len(self.polls) - 1)]
        self.seen += 1
        trials = [_frozen(i, state) for i, state in enumerate(states)]
        for trial in trials:
            trial.user_attrs["heartbeat_s"] = 0 if self.silent else 1
        return trials


@pytest.mark.parametrize(
    "polls, rerun, waits, silent",
    [
        ([[C, C, C]], False, 0, False),  # the study is done
        ([[C, R, C], [C, R, C], [C, F, C, W]], True, 2, False),  # the other machine died: its retry is queued here
        ([[C, R, C], [C, C, C]], False, 1, False),  # the other machine finished its trial
        ([[C, F, C]], False, 0, False),  # nothing running or queued: a failure is a re-run's to retry, not ours
        ([[C, R, R], [C, P, R], [C, P, C]], False, 2, False),  # pruned counts as done
        ([[C, R, C]], False, 0, True),  # the running trial has no heartbeat: it could never be found dead
    ],
)
def test_an_invocation_waits_while_other_machines_hold_the_last_places(monkeypatch, polls, rerun, waits, silent):
    from cxrexp.tuning import workers

    monkeypatch.setattr(workers, "fail_stale", lambda study: None)  # the storage's heartbeat: the fake's polls
    sleeps = []
    study = _FakeStudy(polls, silent)
    assert workers.wait_for_trials_elsewhere(study, 3, poll_s=1.0, sleep=sleeps.append) is rerun
    assert sleeps == [1.0] * waits


@pytest.mark.parametrize(
    "url, lock",
    [
        ("sqlite:///optuna.db", ".optuna.db.lock"),
        ("sqlite:////srv/studies/a.db", "/srv/studies/.a.db.lock"),
        ("sqlite://", None),  # in memory: one process
        ("postgresql://u@h/db", None),  # an advisory lock instead
    ],
)
def test_the_sqlite_study_lock_is_a_hidden_file_beside_the_database_never_the_database(url, lock):
    from cxrexp.tuning.locks import sqlite_lock_path

    assert sqlite_lock_path(url) == (None if lock is None else Path(lock))


def test_study_lock_keys_are_postgresql_bigints_the_same_on_every_machine():
    from cxrexp.tuning.locks import study_lock_key

    keys = {study_lock_key(name) for name in ("cxrexp", "cnn-search", "a" * 200)}
    assert len(keys) == 3 and all(-(2**63) <= key < 2**63 for key in keys)
    assert study_lock_key("cxrexp") == study_lock_key("cxrexp")


def test_a_recorded_parent_that_is_deleted_or_another_studys_is_replaced(in_shared_store):
    from cxrexp.tuning.parent import usable_parent

    client = MlflowClient()
    mine = client.create_run("0", tags={STUDY_NAME_TAG: "mine"}).info.run_id
    other = client.create_run("0", tags={STUDY_NAME_TAG: "other"}).info.run_id
    gone = client.create_run("0", tags={STUDY_NAME_TAG: "mine"}).info.run_id
    client.delete_run(gone)
    assert usable_parent(mine, "mine") is None
    assert "belongs to study 'other'" in usable_parent(other, "mine")
    assert "was deleted" in usable_parent(gone, "mine")
    assert "not in this tracking store" in usable_parent("0" * 32, "mine")
    assert usable_parent(None, "mine") == "no parent run recorded yet"
    for run_id in (mine, other):
        client.set_terminated(run_id)


def test_resuming_with_other_base_settings_is_refused(shared_study, in_shared_store, synthetic_prepared):
    cfg, _ = shared_study
    runs_before = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    with pytest.raises(tuning.StudyMismatch, match=r"epochs \('2' -> '5'\)|epochs \(2 -> 5\)"):
        tuning.run_study(replace(cfg, epochs=5, patience=2), synthetic_prepared, verbose=0)
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == runs_before


# --------------------------------------------------------------------------- pruned, failed, interrupted


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_pruned_trial_is_pruned_in_optuna_and_killed_in_mlflow(in_shared_store, synthetic_prepared, monkeypatch):
    # open_study (cxrexp.tuning.storage) is where the pruner is made.
    monkeypatch.setattr(tuning.storage, "make_pruner", lambda name, max_epochs: AlwaysPrune())
    cfg = study_cfg(study_name="pruned", epochs=2, patience=2, lr_patience=1, registered_model_name="m-pruned")
    with pytest.raises(tuning.StudyFailed, match="no COMPLETE trial"):
        tuning.run_study(cfg, synthetic_prepared, verbose=0)
    (trial,) = load(cfg).trials
    assert trial.state == TrialState.PRUNED
    assert trial.user_attrs[EPOCHS_ATTR] == 1  # stopped after the first of 2 epochs
    run = MlflowClient().get_run(trial.user_attrs[RUN_ID_ATTR])
    assert run.info.status == "KILLED" and run.data.tags[STATE_TAG] == "PRUNED"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "val_auc")) == 1
    parent = MlflowClient().get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"  # no model to register
    assert running_runs() == []


def test_failing_trial_is_fail_while_the_others_complete(in_shared_store, synthetic_prepared, monkeypatch):
    real = training_run.train_and_log
    calls = []

    def diverge_on_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise TrainingDiverged("the loss became NaN in epoch 1 (test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(training_run, "train_and_log", diverge_on_second_call)
    cfg = study_cfg(study_name="failing", n_trials=3, registered_model_name="m-failing")  # storage "": default
    parent_id = tuning.run_study(cfg, synthetic_prepared, verbose=0)
    study = load(cfg, f"sqlite:///{in_shared_store / 'optuna.db'}")  # the default: optuna.db in the cwd
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    statuses = [(r.info.status, r.data.tags[STATE_TAG]) for r in children(parent_id)]
    assert statuses == [("FINISHED", "COMPLETE"), ("FAILED", "FAIL"), ("FINISHED", "COMPLETE")]
    assert "TrainingDiverged" in children(parent_id)[1].data.tags[FAIL_REASON_TAG]
    version = MlflowClient().get_model_version_by_alias(cfg.registered_model_name, CHALLENGER)
    assert version.tags[TRIAL_NUMBER_TAG] in ("0", "2")
    assert tuning.count_done(study) == 2  # a re-run would retry the failed one


def _fake_train_and_log(val_roc_auc: float):
    def fake(cfg, dataset, run_id, **kwargs):
        return training_run.TrainedRun(run_id, "models:/m-none", {"val_roc_auc": val_roc_auc,
                                                                "val_sens_at_spec": val_roc_auc}, 1)
    return fake


def test_nan_objective_fails_the_trial_and_the_attempts_are_bounded(in_shared_store, synthetic_prepared, monkeypatch):
    monkeypatch.setattr(training_run, "train_and_log", _fake_train_and_log(math.nan))
    cfg = study_cfg(study_name="nan", n_trials=2, registered_model_name="m-nan")
    with pytest.raises(tuning.StudyFailed, match="no COMPLETE trial"):
        tuning.run_study(cfg, synthetic_prepared, verbose=0)
    study = load(cfg)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]  # 2 attempts, then stop
    for trial in study.trials:
        run = MlflowClient().get_run(trial.user_attrs[RUN_ID_ATTR])
        assert run.info.status == "FAILED" and "NaN" in run.data.tags[FAIL_REASON_TAG]


def test_ctrl_c_leaves_no_run_running_and_the_study_resumable(in_shared_store, synthetic_prepared, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_run, "train_and_log", interrupt)
    cfg = study_cfg(study_name="interrupted", n_trials=2, registered_model_name="m-interrupted")
    with pytest.raises(KeyboardInterrupt):
        tuning.run_study(cfg, synthetic_prepared, verbose=0)
    (trial,) = load(cfg).trials
    assert trial.state == TrialState.FAIL and tuning.count_done(load(cfg)) == 0
    child = MlflowClient().get_run(trial.user_attrs[RUN_ID_ATTR])
    parent = MlflowClient().get_run(child.data.tags["mlflow.parentRunId"])
    assert (child.info.status, parent.info.status) == ("KILLED", "KILLED")
    assert running_runs() == []


# --------------------------------------------------------------------------- processes and PostgreSQL


@pytest.mark.slow  # 30-47 s each on a 2-core host: README, "Tests"
def test_two_worker_processes_run_exactly_the_requested_trials(in_shared_store, synthetic_prepared, tmp_path):
    cfg = study_cfg(study_name="parallel", n_trials=3, n_jobs=2, storage=f"sqlite:///{tmp_path / 'parallel.db'}",
                    registered_model_name="m-parallel")
    parent_id = tuning.run_study(cfg, synthetic_prepared, verbose=0)
    study = load(cfg)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    kids = children(parent_id)
    assert [r.info.run_name for r in kids] == ["trial-000", "trial-001", "trial-002"]
    assert {t.user_attrs[RUN_ID_ATTR] for t in study.trials} == {r.info.run_id for r in kids}
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3  # workers draw different params
    assert MlflowClient().get_run(parent_id).data.tags.get(MODEL_URI_TAG)
    assert running_runs() == []


@pytest.mark.postgres
def test_study_on_postgresql(in_shared_store, synthetic_prepared):
    postgres_or_skip(POSTGRES_URL)
    cfg = study_cfg(study_name=f"cxrexp-test-{uuid.uuid4().hex[:12]}", storage=POSTGRES_URL, registered_model_name="m-pg")
    try:
        parent_id = tuning.run_study(cfg, synthetic_prepared, verbose=0)
        assert [t.state for t in load(cfg).trials] == [TrialState.COMPLETE]
        assert [r.info.run_name for r in children(parent_id)] == ["trial-000"]
        tuning.run_study(cfg, synthetic_prepared, verbose=0)  # resumes: nothing left to run
        assert len(load(cfg).trials) == 1
    finally:
        try:
            optuna.delete_study(study_name=cfg.study_name, storage=tuning.make_storage(POSTGRES_URL))
        except KeyError:  # never created
            pass


# --------------------------------------------------------------------------- heartbeat: dead workers' trials

# A worker that draws its trial's parameters from the real search space, opens the trial's run, says
# which trial it holds, then sleeps in it until it is killed (as an OOM-killed or lost machine's would).
SLEEPING_WORKER = """
import sys, time
import mlflow, optuna
from cxrexp import tuning
from cxrexp.config import TrainConfig
from cxrexp.tags import RUN_ID_ATTR
from cxrexp.tuning.space import suggest_config

url, name, marker = sys.argv[1:4]
study = optuna.load_study(study_name=name, storage=tuning.make_storage(url, heartbeat=1, stale_after=6))

def objective(trial):
    suggest_config(trial, TrainConfig(), 48)
    run = mlflow.MlflowClient().create_run("0", run_name=f"sleeping-{trial.number}")
    trial.set_user_attr(RUN_ID_ATTR, run.info.run_id)
    open(marker, "w").write(str(trial.number))
    time.sleep(600)
    return 0.5

study.optimize(objective, n_trials=1)
"""


def _start_sleeping_worker(cfg: TrainConfig, marker: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}
    return subprocess.Popen([sys.executable, "-c", SLEEPING_WORKER, cfg.storage, cfg.study_name, str(marker)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _started(proc, marker: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"the worker exited with {proc.returncode}: {proc.stderr.read().decode()[-3000:]}")
    return marker.exists() and bool(marker.read_text())


def _wait_for(condition, what: str, timeout_s: float = 180.0):
    """Poll ``condition`` until it returns something truthy; the timeout only guards against a hang."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # 30-47 s each on a 2-core host: README, "Tests"
def test_a_dead_workers_trial_is_failed_by_its_heartbeat_and_retried_while_a_live_one_is_left_alone(
        in_shared_store, synthetic_prepared, tmp_path):
    from cxrexp.tags import RETRY_OF_TAG
    from cxrexp.tuning import stale

    cfg = study_cfg(study_name="stale", n_trials=2, storage=f"sqlite:///{tmp_path / 'stale.db'}", heartbeat=1,
                    stale_after=6, registered_model_name="m-stale")
    tuning.open_study(cfg, synthetic_prepared)  # the study as train creates it (digest, settings)
    MlflowClient().search_experiments()  # the store exists before two processes open it at once
    markers = {"doomed": tmp_path / "doomed", "alive": tmp_path / "alive"}
    workers = {name: _start_sleeping_worker(cfg, marker) for name, marker in markers.items()}
    try:
        for name, marker in markers.items():
            _wait_for(lambda: _started(workers[name], marker), f"the {name} worker's trial to start")
        number = {name: int(marker.read_text()) for name, marker in markers.items()}
        workers["doomed"].kill()  # SIGKILL: no handler runs, the trial and its run stay RUNNING
        workers["doomed"].wait()
        study = tuning.open_study(cfg, synthetic_prepared, create=False)

        def doomed_failed():
            stale.fail_stale(study)
            return study.trials[number["doomed"]].state == TrialState.FAIL

        _wait_for(doomed_failed, "the dead trial to go stale")
        trials = study.trials
        doomed, alive = trials[number["doomed"]], trials[number["alive"]]
        assert alive.state == TrialState.RUNNING  # still beating: never closed
        client = MlflowClient()
        assert client.get_run(alive.user_attrs[RUN_ID_ATTR]).info.status == "RUNNING"
        dead_run = client.get_run(doomed.user_attrs[RUN_ID_ATTR])
        assert (dead_run.info.status, dead_run.data.tags[STATE_TAG]) == ("KILLED", "FAIL")
        (queued,) = [t for t in trials if t.state == TrialState.WAITING]
        assert queued.params == doomed.params and queued.system_attrs["failed_trial"] == doomed.number

        # The second worker dies too; the next invocation runs both trials again with their parameters.
        workers["alive"].kill()
        workers["alive"].wait()
        _wait_for(lambda: (stale.fail_stale(study), study.trials[number["alive"]].state == TrialState.FAIL)[1],
                  "the second dead trial to go stale")
        tuning.run_study(cfg, synthetic_prepared, verbose=0)
        study = load(cfg)
        retried = [t for t in study.trials if t.state == TrialState.COMPLETE]
        assert sorted(t.system_attrs["failed_trial"] for t in retried) == sorted(number.values())
        assert {tuple(sorted(t.params.items())) for t in retried} == {
            tuple(sorted(t.params.items())) for t in (doomed, alive)}
        for trial in retried:
            run = client.get_run(trial.user_attrs[RUN_ID_ATTR])
            assert run.data.tags[RETRY_OF_TAG] == str(trial.system_attrs["failed_trial"])
        assert running_runs() == []
    finally:
        for proc in workers.values():
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "heartbeat, stale_after, ok",
    [(20, 120, True), (0, 0, True), (1, 3, True), (10, 20, False), (-1, 120, False)],
)
def test_heartbeat_settings_leave_room_for_a_late_beat(heartbeat, stale_after, ok):
    if ok:
        study_cfg(heartbeat=heartbeat, stale_after=stale_after)
    else:
        with pytest.raises(ValueError, match="heartbeat"):
            study_cfg(heartbeat=heartbeat, stale_after=stale_after)


# Opens the storage when told to, as a machine starting `-e train -P storage=...` would: every process
# has imported cxrexp (seconds of TensorFlow) before the go file appears, so they really race.
OPEN_STORAGE_ON_GO = """
import os, sys, time
from cxrexp.tuning.storage import make_storage
url, go = sys.argv[1], sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
make_storage(url, heartbeat=20, stale_after=120)
print("opened")
"""


@pytest.mark.slow  # 35 s on a 2-core host: README, "Tests"
@pytest.mark.postgres
def test_machines_opening_a_fresh_postgresql_storage_at_once_all_succeed(tmp_path):
    """Optuna's CREATE TABLE/TYPE on a fresh database used to kill all but one of them (UniqueViolation)."""
    import subprocess
    import sys

    import sqlalchemy

    postgres_or_skip(POSTGRES_URL)
    name = f"cxrexp_race_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(tuning.rdb_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    go = tmp_path / "go"
    try:
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_STORAGE_ON_GO, url, str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-1500:]
        go.touch()
        outcomes = [proc.communicate(timeout=300) for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * 4, [err[-1500:] for _, err in outcomes]
        assert all(out.strip().endswith("opened") for out, _ in outcomes)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.slow  # 30-47 s each on a 2-core host: README, "Tests"
def test_system_metrics_are_logged_on_the_train_run_and_the_trials_when_asked(in_shared_store, synthetic_prepared,
                                                                             monkeypatch):
    from cxrexp.steps import train_step

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # a 1-epoch run lasts seconds
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    cfg = study_cfg(n_trials=0, data=str(synthetic_prepared.root), system_metrics=True, registered_model_name="m-system")
    train_step.run(cfg)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`cxrexp.step` = 'train' and params.registered_model_name = 'm-system'")
    assert any(key.startswith("system/cpu_utilization") for key in run.data.metrics), sorted(run.data.metrics)
    parent = tuning.run_study(study_cfg(study_name="system", system_metrics=True, registered_model_name="m-sys-study"),
                              synthetic_prepared, verbose=0)
    (trial_run,) = children(parent)
    assert any(key.startswith("system/") for key in trial_run.data.metrics)
    quiet = study_cfg(study_name="quiet", registered_model_name="m-quiet")  # off by default
    (quiet_trial,) = children(tuning.run_study(quiet, synthetic_prepared, verbose=0))
    assert not any(key.startswith("system/") for key in quiet_trial.data.metrics)


@pytest.mark.parametrize("current, new, forward", [(None, "1", True), ("3", "3", True), ("3", "5", True),
                                                   ("5", "3", False), ("10", "9", False)])
def test_an_alias_only_moves_forward(current, new, forward):
    from cxrexp.mlflow_edge.registry import alias_moves_forward

    assert alias_moves_forward(current, new) == forward


def test_an_old_study_never_takes_challenger_back_and_a_twice_registered_best_is_kept_once(
        shared_study, in_shared_store, synthetic_prepared):
    from cxrexp.mlflow_edge import registry

    cfg, _ = shared_study
    name = cfg.registered_model_name
    client = MlflowClient()
    old = client.get_model_version_by_alias(name, CHALLENGER)
    tuning.run_study(study_cfg(study_name="newer", registered_model_name=name), synthetic_prepared, verbose=0)
    newest = client.get_model_version_by_alias(name, CHALLENGER).version
    assert int(newest) > int(old.version)
    tuning.run_study(cfg, synthetic_prepared, verbose=0)  # the old study again: nothing to train
    assert client.get_model_version_by_alias(name, CHALLENGER).version == newest  # not taken back
    # Another machine registered the same best trial at the same moment: one version stays, the first.
    registry.register(old.source, name, alias=None, tags={"train_run_id": old.tags["train_run_id"]})
    tuning.run_study(cfg, synthetic_prepared, verbose=0)
    same = client.search_model_versions(f"name = '{name}' and tags.train_run_id = '{old.tags['train_run_id']}'")
    assert [v.version for v in same] == [old.version]
