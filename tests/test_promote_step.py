"""The promote step against a real registry in a temp store.

One tiny raw-image model is logged once; its "better" and "worse" versions are registrations of that
same model whose evaluate runs are faked with chosen metrics (the step only reads evaluate-tagged
runs), so the step's logic is tested without training many models.
"""

from __future__ import annotations

import json
import types
import uuid

import keras
import mlflow
import pytest
from mlflow.tracking import MlflowClient

from cxrexp.cli import main as cli_main
from cxrexp.config import ImageSpec, PromoteConfig
from cxrexp.mlflow_edge import registry
from cxrexp.mlflow_edge.serving import log_raw_image_model
from cxrexp.steps import promote_step
from cxrexp.tags import (
    CHALLENGER,
    DIGEST_TAG,
    MODEL_URI_TAG,
    PREPARED_DIR_TAG,
    STEP_TAG,
)

from .conftest import temp_mlflow_store

DIGEST = "aaaaaaaaaaaaaaaa"
OTHER_DIGEST = "bbbbbbbbbbbbbbbb"
PREPARED_DIR = "/nonexistent/prepared/synthetic-aaaa"  # only passed on to the (fake) evaluate step


def _metrics(auc: float, sens: float = 0.9, spec: float = 0.9) -> dict[str, float]:
    return {
        "test_sensitivity": sens, "test_sensitivity_ci_low": sens - 0.05, "test_sensitivity_ci_high": min(1, sens + 0.05),
        "test_specificity": spec, "test_specificity_ci_low": spec - 0.05, "test_specificity_ci_high": min(1, spec + 0.05),
        "test_roc_auc": auc, "test_roc_auc_ci_low": auc - 0.03, "test_roc_auc_ci_high": min(1, auc + 0.03),
    }


GOOD = _metrics(0.95)
WORSE = _metrics(0.90)  # passes the 0.85 gate, but 0.05 below a 0.95 champion
BETTER = _metrics(0.97)


def _tiny_keras_model(size: int = 32) -> keras.Model:
    inputs = keras.Input(shape=(size, size, 1), name="image")
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="block1_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    logit = keras.layers.Dense(1, name="logit")(x)
    return keras.Model(inputs, keras.layers.Activation("sigmoid", name="probability")(logit))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temp tracking store holding one logged raw-image model and a fake train run."""
    root = tmp_path_factory.mktemp("promote")
    with temp_mlflow_store(root):
        with mlflow.start_run(run_name="fake-train") as run:
            mlflow.set_tags({STEP_TAG: "train", PREPARED_DIR_TAG: PREPARED_DIR,
                             DIGEST_TAG: DIGEST})
            info = log_raw_image_model(_tiny_keras_model(), ImageSpec(image_size=32, tile_grid=4, lungs="none"), 0.5,
                                       keras_flavour_name=None)
        yield {"model_uri": info.model_uri, "train_run_id": run.info.run_id, "root": root}


def new_name() -> str:
    return f"cxr-test-{uuid.uuid4().hex[:8]}"


def add_version(store, name: str, digest: str = DIGEST) -> str:
    """A new registered version as @challenger, tagged as train_step tags it."""
    return registry.register(store["model_uri"], name, alias=CHALLENGER,
                             tags={"dataset_digest": digest, "train_run_id": store["train_run_id"]})


# An occlusion check that the lungs carry the ranking (lungs-only change -0.01 [-0.03, +0.01]).
LUNGS_READ = {"occlusion_n": 100.0, "occlusion_lungs_only_auc_change": -0.01,
              "occlusion_lungs_only_auc_change_ci_low": -0.03, "occlusion_lungs_only_auc_change_ci_high": 0.01}


def fake_evaluation(name: str, version: str, metrics: dict, *, digest: str = DIGEST, audit: str = "passed",
                    model_uri: str | None = None, threshold: float = -1.0, predictions=None,
                    occlusion: dict | None = None, occlusion_note: str = "computed on 100 cases") -> str:
    """An evaluate run as evaluate_step records it: step/model_uri/digest/audit/occlusion tags, test_* and
    occlusion_* metrics (``occlusion`` default ``LUNGS_READ``) and, when given, the per-case ``predictions.csv``."""
    with mlflow.start_run(run_name="fake-evaluate") as run:
        mlflow.set_tags({STEP_TAG: "evaluate", MODEL_URI_TAG: model_uri or f"models:/{name}/{version}",
                         DIGEST_TAG: digest, "cxrexp.audit": audit, "cxrexp.occlusion": occlusion_note})
        mlflow.log_params({"threshold": threshold, "min_lung_focus": 0.5, "min_lung_focus_lift": 1.0,
                           "occlusion_margin": 0.1})
        mlflow.log_metrics({**metrics, "audit_passed": float(audit == "passed"), "threshold": 0.5,
                            **(LUNGS_READ if occlusion is None else occlusion)})
        if predictions is not None:
            from cxrexp.mlflow_edge import tracking

            tracking.log_frame(predictions, "predictions.csv")
    return run.info.run_id


def config(name: str, **overrides) -> PromoteConfig:
    return PromoteConfig(registered_model_name=name, **overrides)


def version_tags(name: str, version: str) -> dict[str, str]:
    return MlflowClient().get_model_version(name, version).tags


def promote_runs(name: str) -> list:
    return [r for r in MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"tags.`{STEP_TAG}` = 'promote' and tags.`cxrexp.registered_model_name` = '{name}'",
        order_by=["attributes.start_time DESC"],
    )]


@pytest.fixture()
def fake_evaluate_step(monkeypatch):
    """Replace the evaluate run by one that logs chosen metrics and records how it was called."""
    calls: list[dict] = []
    metrics_by_uri: dict[str, dict] = {}
    digest_by_data: dict[str, str] = {PREPARED_DIR: DIGEST}

    def run(cfg):
        calls.append({"model_uri": cfg.model_uri, "data": cfg.data, "active_run": mlflow.active_run(),
                      "env_run_id": __import__("os").environ.get("MLFLOW_RUN_ID"), "external": cfg.external})
        name, version = cfg.model_uri[len("models:/"):].split("/")
        return fake_evaluation(name, version, metrics_by_uri[cfg.model_uri], digest=digest_by_data[cfg.data])

    from cxrexp.mlflow_edge import evaluation_run

    monkeypatch.setattr(evaluation_run, "run", run)
    return types.SimpleNamespace(calls=calls, metrics=metrics_by_uri, digests=digest_by_data)


# ------------------------------------------------------------------------------------------------


def test_first_promotion_sets_champion_and_records_tags(store, capsys):
    name = new_name()
    v1 = add_version(store, name)
    evaluate_run = fake_evaluation(name, v1, GOOD)
    assert promote_step.run(config(name)) == 0
    assert registry.aliases(name) == {"champion": v1}  # challenger removed: decided
    tags = version_tags(name, v1)
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.roc_auc"] == "pass value=0.95 limit=0.85"
    assert tags["promotion.champion"] == "pass"
    assert tags["promotion.replaced"] == ""
    assert tags["promotion.reasons"].count("\n") == 7  # eight gates, one line each
    assert tags["promotion.occlusion"].startswith("pass value=-0.03 limit=")
    out = capsys.readouterr().out
    assert "PROMOTED: version 1" in out and "no champion yet" in out and evaluate_run in out
    (run,) = promote_runs(name)
    assert run.data.metrics["promoted"] == 1.0
    assert run.data.tags["cxrexp.challenger_evaluate_run"] == evaluate_run
    decision = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/decision.json")
    assert decision["outcome"] == "promoted" and decision["champion"] is None
    assert decision["alias_moves"] == ["@champion: (none) -> version 1", "@challenger: version 1 -> (none)"]


def test_worse_challenger_is_refused_and_aliases_stay(store, capsys):
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD)
    assert promote_step.run(config(name)) == 0
    v2 = add_version(store, name)
    fake_evaluation(name, v2, WORSE)
    capsys.readouterr()
    assert promote_step.run(config(name)) == 0  # "no" is a valid answer
    assert registry.aliases(name) == {"challenger": v2, "champion": v1}
    tags = version_tags(name, v2)
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.champion"] == "fail value=0.9 limit=0.95"
    assert tags["promotion.champion_version"] == v1
    out = capsys.readouterr().out
    assert "NOT PROMOTED: version 2 failed 1 gate(s) (champion); @champion stays version 1" in out
    assert "FAIL champion: test_roc_auc 0.9000 vs champion version 1's 0.9500 (difference -0.0500, higher" in out
    assert "point estimates: no per-case predictions to pair" in out
    assert version_tags(name, v1)["promotion.decision"] == "promoted"  # the champion's record is untouched


def _predictions(seed: int, separation: float):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(60), np.zeros(60)].astype(int)
    noise = np.random.default_rng(0).normal(0, 1, 120)  # the same hard cases for both models
    probability = 1 / (1 + np.exp(-(separation * (2 * labels - 1) + noise + rng.normal(0, 0.1, 120))))
    return pd.DataFrame({"source": [f"/d/case-{i}.png" for i in range(120)], "class_name": "x", "label": labels,
                         "probability": probability})


def test_the_champion_gate_pairs_the_two_evaluations_cases(store, capsys):
    """Both evaluate runs logged predictions.csv: the decision rests on the paired interval, and
    decision.json and the run's metrics carry the difference and its interval."""
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD, predictions=_predictions(1, 1.0))
    assert promote_step.run(config(name)) == 0
    v2 = add_version(store, name)
    fake_evaluation(name, v2, WORSE, predictions=_predictions(2, 0.3))  # clearly worse, same cases
    capsys.readouterr()
    assert promote_step.run(config(name)) == 0
    out = capsys.readouterr().out
    assert registry.aliases(name) == {"challenger": v2, "champion": v1}
    assert "paired 95% interval" in out and "over 120 shared test cases" in out and "not shown non-inferior" in out
    run = promote_runs(name)[0]
    gate = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/decision.json")["gates"]["champion"]
    assert gate["comparison"] == "paired bootstrap" and gate["n_cases"] == 120
    assert gate["difference_ci_high"] < -0.01 and gate["passed"] is False
    assert run.data.metrics["champion_gate_difference_ci_high"] == pytest.approx(gate["difference_ci_high"])


def test_a_champion_alias_moved_while_deciding_refuses_and_moves_nothing(store, monkeypatch, capsys):
    """Someone moves @champion between promote reading the evidence and moving the alias."""
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD)
    assert promote_step.run(config(name)) == 0
    v2 = add_version(store, name)
    fake_evaluation(name, v2, BETTER)
    v3 = add_version(store, name)  # becomes @challenger; v2 is judged below

    real_decide = promote_step.decide

    def decide_then_someone_moves_the_champion(*args, **kwargs):
        decision = real_decide(*args, **kwargs)
        MlflowClient().set_registered_model_alias(name, "champion", v3)  # a person in the UI
        return decision

    MlflowClient().set_registered_model_alias(name, "challenger", v2)
    monkeypatch.setattr(promote_step, "decide", decide_then_someone_moves_the_champion)
    capsys.readouterr()
    assert promote_step.run(config(name)) == promote_step.EXIT_CANNOT_DECIDE
    err = capsys.readouterr().err
    assert f"@champion moved while promote was deciding: it was version {v1}" in err and f"is version {v3} now" in err
    assert registry.aliases(name)["champion"] == v3 and registry.aliases(name)["challenger"] == v2
    assert "promotion.decision" not in version_tags(name, v2)  # no decision recorded on stale facts
    assert promote_runs(name)[0].data.tags["cxrexp.decision"] == "refused-alias-moved"


def test_better_challenger_is_promoted_and_rollback_walks_back(store, capsys):
    name = new_name()
    versions = []
    for metrics in (GOOD, BETTER, _metrics(0.99)):
        version = add_version(store, name)
        fake_evaluation(name, version, metrics)
        assert promote_step.run(config(name)) == 0
        versions.append(version)
    v1, v2, v3 = versions
    assert registry.aliases(name) == {"champion": v3, "previous-champion": v2}
    assert version_tags(name, v3)["promotion.replaced"] == v2
    capsys.readouterr()

    assert promote_step.rollback(name) == 0
    assert registry.aliases(name) == {"champion": v2, "previous-champion": v1, "rolled-back": v3}
    assert "promotion.rolled_back" in version_tags(name, v3)
    out = capsys.readouterr().out
    assert "@champion: version 3 -> version 2" in out and "@rolled-back: (none) -> version 3" in out

    assert cli_main(["rollback", "--registered-model-name", name]) == 0  # through the CLI as well
    assert registry.aliases(name) == {"champion": v1, "rolled-back": v2}

    assert promote_step.rollback(name) == 2  # v1 replaced nothing: history exhausted
    assert "nothing to roll back" in capsys.readouterr().err
    assert registry.aliases(name) == {"champion": v1, "rolled-back": v2}


def test_dry_run_moves_nothing_and_writes_no_tags(store, capsys):
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD)
    assert promote_step.run(config(name, dry_run=True)) == 0
    assert registry.aliases(name) == {"challenger": v1}
    assert not any(key.startswith("promotion.") for key in version_tags(name, v1))
    assert "DRY RUN: version 1 passes every gate and WOULD be promoted; nothing was moved" in capsys.readouterr().out
    (run,) = promote_runs(name)
    assert run.data.tags["cxrexp.decision"] == "would-promote" and run.data.metrics["promoted"] == 0.0


@pytest.mark.parametrize(
    "setup, words",
    [
        ("champion only", "has no @challenger alias (its aliases: champion -> 1)"),
        ("no model", "no registered model named"),
    ],
)
def test_missing_challenger_cannot_decide(store, capsys, setup, words):
    name = new_name()
    if setup == "champion only":
        v1 = add_version(store, name)
        fake_evaluation(name, v1, GOOD)
        assert promote_step.run(config(name)) == 0
    assert cli_main(["promote", "--registered-model-name", name]) == 2
    err = capsys.readouterr().err
    assert "cannot decide" in err and words in err and name in err
    assert len(promote_runs(name)) == (1 if setup == "champion only" else 0)  # a refusal to decide logs no run


def test_already_champion_is_not_judged_again(store, capsys):
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD)
    MlflowClient().set_registered_model_alias(name, "champion", v1)
    assert promote_step.run(config(name)) == 0
    assert "already is @champion: nothing to decide" in capsys.readouterr().out
    assert promote_runs(name) == []


def test_failing_gates_refuse_a_first_model(store, capsys):
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, _metrics(0.95, sens=0.6), audit="failed",
                    occlusion={"occlusion_n": 0.0}, occlusion_note="no case has a real lung mask (dataset or segmenter)")
    assert promote_step.run(config(name, require_audit=True)) == 0
    assert registry.aliases(name) == {"challenger": v1}
    out = capsys.readouterr().out
    assert "failed 3 gate(s) (sensitivity, audit, occlusion); there is still no @champion" in out
    # The evaluate run's own reason travels to the decision (its tag), so the fix is in the message.
    assert "occlusion check was not computed (no case has a real lung mask (dataset or segmenter))" in out
    # By default the heatmap audit is shown, not required: the same evidence fails on the other two alone.
    v2 = add_version(store, name)
    fake_evaluation(name, v2, _metrics(0.95, sens=0.6), audit="failed",
                    occlusion={"occlusion_n": 0.0}, occlusion_note="no case has a real lung mask (dataset or segmenter)")
    assert promote_step.run(config(name)) == 0
    out = capsys.readouterr().out
    assert "failed 2 gate(s) (sensitivity, occlusion)" in out and "pass audit: not required (its result: failed)" in out


def test_missing_evaluations_are_run_first_outside_the_promote_run(store, fake_evaluate_step, capsys):
    """No evaluate run on the challenger's dataset: the step evaluates both versions, each in its own run."""
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD, digest=OTHER_DIGEST)  # the champion's figures are on another dataset
    MlflowClient().set_registered_model_alias(name, "champion", v1)
    v2 = add_version(store, name)
    # An evaluation at an overridden threshold measures another operating point: not reusable.
    fake_evaluation(name, v2, BETTER, threshold=0.3)
    fake_evaluate_step.metrics.update({f"models:/{name}/{v1}": GOOD, f"models:/{name}/{v2}": BETTER})

    assert promote_step.run(config(name)) == 0
    calls = fake_evaluate_step.calls
    assert [c["model_uri"] for c in calls] == [f"models:/{name}/{v2}", f"models:/{name}/{v1}"]
    assert all(c["data"] == PREPARED_DIR for c in calls)  # the champion judged on the challenger's data
    assert all(c["active_run"] is None and c["env_run_id"] is None for c in calls)  # not nested
    assert registry.aliases(name) == {"champion": v2, "previous-champion": v1}
    (run,) = promote_runs(name)
    evaluate_runs = [run.data.tags["cxrexp.challenger_evaluate_run"], run.data.tags["cxrexp.champion_evaluate_run"]]
    for run_id in evaluate_runs:
        evaluated = MlflowClient().get_run(run_id)
        assert evaluated.data.tags[DIGEST_TAG] == DIGEST
        assert "mlflow.parentRunId" not in evaluated.data.tags
    assert "(evaluated now)" in capsys.readouterr().out

    # A second decision reuses those evaluations instead of evaluating again.
    v3 = add_version(store, name)
    fake_evaluation(name, v3, WORSE)
    assert promote_step.run(config(name)) == 0
    assert len(calls) == 2


# An external collection's occlusion check as evaluate logs it: with only the lungs shown the ranking falls.
EXT_FALLS = {"external_ext_nih_occlusion_n": 311.0, "external_ext_nih_occlusion_lungs_only_auc_change": -0.18,
             "external_ext_nih_occlusion_lungs_only_auc_change_ci_low": -0.24,
             "external_ext_nih_occlusion_lungs_only_auc_change_ci_high": -0.12}


def test_external_occlusion_needs_an_evaluation_that_scored_the_collections(store, fake_evaluate_step, capsys, tmp_path):
    """promote -P external=DIR: an evaluate run without that collection is not reused; the step runs one
    with the folders, and the decision holds the collection to the occlusion rule."""
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD)  # scored no external collection
    fake_evaluate_step.metrics[f"models:/{name}/{v1}"] = {**GOOD, **EXT_FALLS}
    folder = str(tmp_path / "ext-nih")
    # A folder that is not there: refused before any evaluation, naming it.
    assert promote_step.run(config(name, external=(folder,))) == promote_step.EXIT_CANNOT_DECIDE
    assert f"--external {folder} is not a folder" in capsys.readouterr().err
    assert fake_evaluate_step.calls == []
    (tmp_path / "ext-nih").mkdir()
    assert promote_step.run(config(name, external=(folder,))) == 0
    assert [(c["model_uri"], c["external"]) for c in fake_evaluate_step.calls] == [(f"models:/{name}/{v1}", (folder,))]
    assert registry.aliases(name) == {"challenger": v1}  # refused: the collection's ranking leaves the lungs
    out = capsys.readouterr().out
    assert "failed 1 gate(s) (external_occlusion)" in out
    assert "ext_nih: FAILS: with only the lungs shown, its ROC-AUC changes by -0.1800 [-0.2400, -0.1200]" in out
    (run,) = promote_runs(name)
    assert run.data.metrics["gate_external_occlusion_passed"] == 0.0
    # Without -P external the same evidence is promotable, and the collection is still shown.
    assert promote_step.run(config(name)) == 0
    assert len(fake_evaluate_step.calls) == 1  # the evaluation that scored ext_nih is reused
    assert registry.aliases(name) == {"champion": v1}
    assert "not required (no -P external given; the evaluate run's external collections at this rule: ext_nih fails)" \
        in capsys.readouterr().out


def test_evaluation_of_the_source_logged_model_is_reused(store, fake_evaluate_step):
    """main's evaluate runs on models:/m-<id> (the logged model a version was registered from)."""
    name = new_name()
    v1 = add_version(store, name)
    fake_evaluation(name, v1, GOOD, model_uri=store["model_uri"])
    assert promote_step.run(config(name)) == 0
    assert fake_evaluate_step.calls == []
    assert registry.aliases(name) == {"champion": v1}


def test_explicit_data_that_is_not_a_dataset_cannot_decide(store, capsys):
    name = new_name()
    add_version(store, name)
    assert promote_step.run(config(name, data=str(store["root"] / "missing"))) == 2
    assert "cannot decide" in capsys.readouterr().err


def test_promote_with_rollback_flag_rolls_back(store):
    name = new_name()
    for metrics in (GOOD, BETTER):
        version = add_version(store, name)
        fake_evaluation(name, version, metrics)
        assert promote_step.run(config(name)) == 0
    assert promote_step.run(config(name, rollback=True)) == 0
    assert registry.aliases(name) == {"champion": "1", "rolled-back": "2"}
    rollback_run = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()],
        filter_string=f"tags.`{STEP_TAG}` = 'rollback' and tags.`cxrexp.registered_model_name` = '{name}'",
    )
    assert len(rollback_run) == 1
    moves = json.loads(mlflow.artifacts.load_text(f"runs:/{rollback_run[0].info.run_id}/rollback.json"))["moves"]
    assert ["champion", "2", "1"] in moves


def test_real_pipeline_train_evaluate_promote(synthetic_prepared, tmp_path, monkeypatch, capsys):
    """The tag contract with the real evaluate step: train two tiny models, promote evaluates each itself."""
    from cxrexp.config import TrainConfig
    from cxrexp.steps import train_step

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        name = "cxr-e2e"
        train_cfg = TrainConfig(data=str(synthetic_prepared.root), epochs=2, filters=(8, 16), dense=(8,),
                                patience=2, lr_patience=1, batch_size=32, registered_model_name=name)
        train_step.run(train_cfg)
        # Lenient gates: an untrained-looking tiny model must still be promotable on the first go.
        lenient = dict(min_sensitivity=0.0, min_specificity=0.0, min_roc_auc=0.0, require_audit=False,
                       require_occlusion=False)
        assert promote_step.run(config(name, **lenient)) == 0
        assert registry.aliases(name) == {"champion": "1"}
        out = capsys.readouterr().out
        assert "(evaluated now)" in out and "PROMOTED: version 1" in out
        # The occlusion metrics' names as the real evaluate step logs them reach the gate (shown, not required).
        assert "pass occlusion: not required (its lungs-only change: lower bound " in out
        evaluations = MlflowClient().search_runs(
            [e.experiment_id for e in MlflowClient().search_experiments()],
            filter_string=f"tags.`{STEP_TAG}` = 'evaluate'",
        )
        assert [r.data.tags[MODEL_URI_TAG] for r in evaluations] == [f"models:/{name}/1"]
        assert evaluations[0].data.tags[DIGEST_TAG] == synthetic_prepared.digest
        assert "test_roc_auc" in evaluations[0].data.metrics

        train_step.run(train_cfg)  # version 2, same data and seed
        assert promote_step.run(config(name, **lenient, margin=0.5)) == 0
        assert registry.aliases(name) == {"champion": "2", "previous-champion": "1"}
        assert promote_step.rollback(name) == 0
        assert registry.aliases(name)["champion"] == "1"
    finally:
        mlflow.set_tracking_uri(None)
