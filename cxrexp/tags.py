"""The run-tag contract: every MLflow tag, registry alias and Optuna attribute that one step writes
and another step (or a reader in ``mlflow ui``) reads. One home, so writer and reader cannot drift
apart. Imports nothing.

Prefixes: ``cxrexp.`` on runs, ``optuna.`` on trial and study runs, ``promotion.`` on model versions.
"""

# --- every run --------------------------------------------------------------------------------
STEP_TAG = "cxrexp.step"  # preprocess | train | trial | evaluate | promote | main
GIT_TAG = "cxrexp.git_commit"
PREPARED_DIR_TAG = "cxrexp.prepared_dir"  # the prepared dataset folder a run read or wrote
DIGEST_TAG = "cxrexp.dataset_digest"  # that dataset's identity (content, labels, splits, settings)
MODEL_URI_TAG = "cxrexp.model_uri"  # train: the logged model; evaluate: the model judged

# Step names, as STEP_TAG holds them.
PREPROCESS_STEP = "preprocess"
TRAIN_STEP = "train"
TRIAL_STEP = "trial"
EVALUATE_STEP = "evaluate"
PROMOTE_STEP = "promote"
MAIN_STEP = "main"
SEGMENT_STEP = "segment"

# --- preprocess / train ---------------------------------------------------------------------------
REUSED_PREPARED_TAG = "cxrexp.reused_prepared"
# preprocess, train, evaluate: the segmenter version whose masks made the lung crop ("" with lungs=none).
LUNG_MODEL_TAG = "cxrexp.lung_model"
SEGMENTER_VERSION_TAG = "cxrexp.segmenter_version"  # segment: the version it registered
SEGMENTER_CHAMPION_TAG = "cxrexp.segmenter_champion"  # segment: why @champion moved or stayed
LUNG_FALLBACK_WARNING_TAG = "cxrexp.lung_fallback_warning"  # preprocess: fallback rates differ by class
REGISTERED_VERSION_TAG = "cxrexp.registered_version"

# --- evaluate -------------------------------------------------------------------------------------
AUDIT_TAG = "cxrexp.audit"  # passed | failed
AUDIT_REASON_TAG = "cxrexp.audit_reason"
AUDIT_PASSED_METRIC = "audit_passed"  # 1 / 0, beside the tag
OCCLUSION_TAG = "cxrexp.occlusion"  # "computed on N cases" | why not (no masks, one class, failed: ...)
TRAIN_RUN_TAG = "cxrexp.train_run_id"
MODEL_ID_TAG = "cxrexp.model_id"
MODEL_VERSION_TAG = "cxrexp.model_version"
REGISTERED_MODEL_TAG = "cxrexp.registered_model"
TRAINING_DIGEST_TAG = "cxrexp.training_dataset_digest"
THRESHOLD_SOURCE_TAG = "cxrexp.threshold_source"  # flag | model
NOTE_TAG_PREFIX = "cxrexp.note."  # + metric name: why it is undefined
MLFLOW_EVALUATE_TAG = "cxrexp.mlflow_evaluate"

# --- main -----------------------------------------------------------------------------------------
PREPROCESS_RUN_TAG = "cxrexp.preprocess_run"
SEGMENT_RUN_OF_MAIN_TAG = "cxrexp.segment_run"
SEGMENTER_CHOICE_TAG = "cxrexp.segmenter_choice"  # which segmenter cuts main's lung views, and why
TRAIN_RUN_OF_MAIN_TAG = "cxrexp.train_run"
EVALUATE_RUN_TAG = "cxrexp.evaluate_run"

# --- promote --------------------------------------------------------------------------------------
REGISTERED_MODEL_NAME_TAG = "cxrexp.registered_model_name"
CHALLENGER_VERSION_TAG = "cxrexp.challenger_version"
CHALLENGER_EVALUATE_RUN_TAG = "cxrexp.challenger_evaluate_run"
CHAMPION_VERSION_TAG = "cxrexp.champion_version"
CHAMPION_EVALUATE_RUN_TAG = "cxrexp.champion_evaluate_run"
DECISION_OUTCOME_TAG = "cxrexp.decision"

# --- registry: aliases and model-version tags -----------------------------------------------------
CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
ROLLED_BACK = "rolled-back"
VERSION_DIGEST_TAG = "dataset_digest"  # on a model version: the data it was trained on
VERSION_TRAIN_RUN_TAG = "train_run_id"
PROMOTION_TAG_PREFIX = "promotion."
DECISION_TAG = "promotion.decision"
REASONS_TAG = "promotion.reasons"
REPLACED_TAG = "promotion.replaced"
PROMOTED_AT_TAG = "promotion.promoted_at"
ROLLED_BACK_TAG = "promotion.rolled_back"
DECIDED_AT_TAG = "promotion.decided_at"

# --- Optuna: trial runs and trial attributes ------------------------------------------------------
STATE_TAG = "optuna.state"
TRIAL_NUMBER_TAG = "optuna.trial_number"
STUDY_NAME_TAG = "optuna.study_name"
FAIL_REASON_TAG = "optuna.fail_reason"
TIMED_OUT_TAG = "optuna.timed_out"
PRUNED_AT_TAG = "optuna.pruned_at"
STORAGE_TAG = "optuna.storage"
TRIALS_DONE_BEFORE_TAG = "optuna.trials_done_before"
WORKER_EXIT_CODES_TAG = "optuna.worker_exit_codes"
BEST_TRIAL_NUMBER_TAG = "optuna.best_trial_number"
BEST_RUN_ID_TAG = "optuna.best_run_id"
BEST_PARAM_TAG_PREFIX = "optuna.best."  # + a searched parameter: the best trial's value (a tag: it changes)
STUDY_RUN_TAG = "optuna.study_run_id"  # on an invocation that joined a study: the study's one parent run
INVOCATION_TAG = "optuna.invocation_run_id"  # on a trial run: the invocation (train run) that ran it
RETRY_OF_TAG = "optuna.retry_of"  # on a trial run: the number of the stale trial it runs again
RUN_ID_ATTR = "mlflow_run_id"  # trial user attr: the trial's MLflow run
EPOCHS_ATTR = "epochs_trained"  # trial user attr: epochs it trained (pruned trials too)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study user attr: the study's one parent run, found or created once
WORKER_ATTR = "worker"  # trial user attr: host:pid of the process that ran it
HEARTBEAT_ATTR = "heartbeat_s"  # trial user attr: it beats this often (so a silent one is found dead)
SURPLUS_ATTR = "surplus"  # trial user attr: not run, the study's n_trials was reached on other machines

# --- the logged model ----------------------------------------------------------------------------
SERVING_METADATA_KEY = "cxrexp_serving"  # MLmodel metadata: the serving spec and the two keys below
META_DIGEST_KEY = "dataset_digest"  # the prepared dataset the model was trained on
META_TRAIN_RUN_KEY = "train_run_id"  # the run that trained it

# The evaluate run's per-case test predictions (source, class_name, label, probability, predicted,
# cell): promote pairs the challenger's and the champion's on the same cases.
PREDICTIONS_ARTIFACT = "predictions.csv"
