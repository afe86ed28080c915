"""An evaluate run: one MLflow run that judges a logged model on a prepared test split (MLflow edge).

What it logs (the contract the promote step and readers rely on):

- metrics ``test_<name>`` for every name of ``metrics.evaluate_predictions`` (counts, rates with
  ``_ci_low``/``_ci_high``, ``roc_auc``, ``pr_auc``, ``brier``, ``ppv/npv_at_prevalence`` when a
  prevalence is given), plus ``test_n`` and ``threshold`` (the one used);
- ``metric_notes.json`` (metric -> why it is NaN) and a tag ``cxrexp.note.<metric>`` per undefined
  point estimate;
- ``predictions.csv`` (source, class_name, label, probability, predicted, cell) for the test split;
- ``figures/``: confusion matrix, ROC with the operating point, PR, calibration, threshold sweep,
  Grad-CAM gallery, lung-focus distribution, occlusion views (when the occlusion check computed);
- ``gradcam/<cell>_<n>_overlay.png`` and ``_contour.png`` for a fixed seeded sample per confusion
  cell, with ``gradcam/samples.csv``;
- shortcut audit: metrics ``audit_lung_focus_mean``, ``audit_lung_focus_median``,
  ``audit_border_share_mean``, ``audit_n``, ``audit_passed`` (1/0), tags ``cxrexp.audit``
  (``passed``/``failed``) and ``cxrexp.audit_reason``, ``audit/scores.csv``;
- occlusion check (gated by promote, not here; ``cxrexp.evaluation.occlusion``): ``occlusion_n`` and, when both classes
  have cases with a real lung mask, ``occlusion_<view>_roc_auc`` (+ ``_ci_low``/``_ci_high``) for
  ``whole``, ``lungs_only``, ``outside_only``, ``shape_only`` and ``occlusion_<view>_auc_change`` (paired,
  + CI) for the last three, and tag ``cxrexp.occlusion`` ("computed on N cases", or why not); the same
  metrics as ``external_<name>_occlusion_*`` for each external collection;
- ``report.html``: the self-contained model card (``cxrexp.evaluation.model_card``);
- tags ``cxrexp.model_uri``, ``cxrexp.model_id``, ``cxrexp.registered_model``,
  ``cxrexp.model_version``, ``cxrexp.train_run_id``, ``cxrexp.dataset_digest`` (the test data),
  ``cxrexp.training_dataset_digest``, and the test split as an ``mlflow.data`` input (context
  ``test``).

Every check that can fail on user input (model URI, dataset, image settings, empty test split)
runs before the MLflow run starts, so a mistake costs no run and no compute.

The pure parts (image-setting comparison, confusion cells, the seeded sampling of Grad-CAM cases
and the shortcut audit) live in ``cxrexp/audit.py``; this module resolves, runs and logs.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cxrexp.config import EvaluateConfig
from cxrexp.credentials import redact
from cxrexp.data.discovery import discover
from cxrexp.data.store import PreparedDataset, open_prepared
from cxrexp.errors import ModelNotFound, PreparedDataError
from cxrexp.evaluation import model_card
from cxrexp.evaluation.external import (
    ExternalResult,
    card_values,
    collection_names,
    external_warning,
    logged_metrics,
    training_duplicates,
)
from cxrexp.evaluation.metrics import evaluate_predictions
from cxrexp.evaluation.occlusion import OcclusionResult, occlusion_metrics
from cxrexp.evaluation.test_evaluation import (
    card_notes,
    check_spec,
    evaluate_test_split,
    evaluation_frame,
    summary_text,
    training_overlap,
)
from cxrexp.mlflow_edge import evaluation_logging, run_names, tracking
from cxrexp.mlflow_edge.model_uri import ModelSource, describe_model
from cxrexp.promotion import Evidence, Gates, external_occlusion_gate, occlusion_gate
from cxrexp.tags import (
    AUDIT_REASON_TAG,
    AUDIT_TAG,
    EVALUATE_STEP,
    MLFLOW_EVALUATE_TAG,
    MODEL_ID_TAG,
    MODEL_URI_TAG,
    MODEL_VERSION_TAG,
    OCCLUSION_TAG,
    PREDICTIONS_ARTIFACT,
    PREPARED_DIR_TAG,
    REGISTERED_MODEL_TAG,
    THRESHOLD_SOURCE_TAG,
    TRAIN_RUN_TAG,
    TRAINING_DIGEST_TAG,
)

log = logging.getLogger(__name__)


def training_dataset(source: ModelSource) -> PreparedDataset:
    """The prepared dataset the model was trained on, found through its training run's tag."""
    if not source.train_run_id:
        raise PreparedDataError(
            f"{source.model_uri} carries no training run id, so its dataset is unknown: pass --data "
            "(a prepared dataset folder or a preprocess run id)"
        )
    try:
        run = MlflowClient().get_run(source.train_run_id)
    except MlflowException as err:
        raise PreparedDataError(
            f"the training run {source.train_run_id} of {source.model_uri} is not in {redact(mlflow.get_tracking_uri())} "
            f"({err.message}): pass --data"
        ) from err
    prepared = run.data.tags.get(PREPARED_DIR_TAG)
    if not prepared:
        raise PreparedDataError(
            f"the training run {source.train_run_id} of {source.model_uri} has no {PREPARED_DIR_TAG} tag: "
            "pass --data"
        )
    try:
        dataset = open_prepared(prepared)
    except PreparedDataError as err:
        raise PreparedDataError(
            f"{source.model_uri} was trained on the prepared dataset {prepared} (digest "
            f"{source.dataset_digest or 'unknown'}), which cannot be opened: {err}. Prepare it again "
            "with the same settings or pass --data"
        ) from err
    if source.dataset_digest and dataset.digest != source.dataset_digest:
        raise PreparedDataError(
            f"{source.model_uri} was trained on dataset {source.dataset_digest}, but {prepared} now holds "
            f"{dataset.digest} (prepared again with other data or settings): pass --data explicitly"
        )
    return dataset


def resolve_data(data: str, source: ModelSource) -> tuple[PreparedDataset, PreparedDataset | None]:
    """(dataset to evaluate on, the training dataset when it can be found)."""
    if not data:
        dataset = training_dataset(source)
        return dataset, dataset
    dataset = tracking.resolve_prepared(data)
    try:
        trained_on = training_dataset(source)
    except PreparedDataError as err:
        log.info("training dataset of %s not available for the overlap check: %s", source.model_uri, err)
        trained_on = None
    return dataset, trained_on


def run(cfg: EvaluateConfig) -> str:
    """Evaluate ``cfg.model_uri`` on the test split as one MLflow run; returns the run id.

    Raises ``ModelNotFound`` (unknown URI) or ``PreparedDataError`` (dataset missing, prepared with
    other image settings, empty test split) before the run starts. The flags were checked by the step.

    Long: it is the run's script, one block per logged part in the order the module docstring lists them; the work is in ``evaluation_logging`` and ``evaluation.test_evaluation``.
    """
    from cxrexp.data.tfdata import predict_probabilities
    from cxrexp.mlflow_edge import serving

    loaded = serving.load_classifier(cfg.model_uri)
    model, model_spec, model_threshold = loaded.keras_model, loaded.image_spec, loaded.threshold
    source = describe_model(cfg.model_uri)
    dataset, trained_on = resolve_data(cfg.data, source)
    check_spec(cfg.model_uri, model_spec, dataset)
    test = evaluation_frame(dataset)
    threshold = float(cfg.threshold) if cfg.threshold >= 0 else float(model_threshold)
    prevalence = float(cfg.prevalence) if cfg.prevalence >= 0 else None
    training_digest = trained_on.digest if trained_on is not None else source.dataset_digest
    for folder in cfg.external:  # a collection without the model's class folders fails before the run
        discover(folder, (dataset.positive_class, dataset.negative_label), dataset.positive_class)

    with tracking.step_run(
        EVALUATE_STEP, cfg, run_name=run_names.evaluate_name(source.label(), dataset.digest),
        extra_params={"image_size": dataset.image_size, "model_threshold": model_threshold},
    ) as active:
        run_id = active.info.run_id
        _tag_model(cfg, source, training_digest)
        test_data = tracking.log_prepared_dataset(dataset, context="test")  # also tags prepared_dir and digest
        probabilities = predict_probabilities(
            model, dataset.images(), test["row"].to_numpy(np.int64), cfg.batch_size
        ).astype(np.float64)
        judged = evaluate_test_split(test, probabilities, threshold, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed,
                                     prevalence=prevalence)
        overlap = training_overlap(test, trained_on)
        # The test split's own figures are logged first: nothing after them (a segmenter lookup, an
        # external collection) can cost the user what the run is for.
        evaluation_logging.log_test_metrics(judged.evaluation, len(test), threshold, overlap, source.model_id, test_data)
        tracking.log_frame(judged.predictions, PREDICTIONS_ARTIFACT)
        mlflow_status = evaluation_logging.mlflow_cross_check(judged.predictions, judged.counts)
        mlflow.set_tag(MLFLOW_EVALUATE_TAG, mlflow_status[:500])
        segment, segmenter_name = audit_segmenter(cfg, loaded)
        external = score_external(cfg, model, model_spec, threshold, dataset, trained_on,
                                  lung_masks=loaded.lung_masks, segment=segment,
                                  segmenter_name=segmenter_name) if cfg.external else []
        for result in external:
            tracking.log_metrics(logged_metrics(result))
        external_warnings = [w for w in (external_warning(r.name, judged.evaluation.metrics, r.evaluation.metrics)
                                         for r in external) if w]
        for text in external_warnings:
            print(f"WARNING: {text}")

        stage = evaluation_logging.Staging()
        try:
            labels = judged.predictions["label"].to_numpy()
            figures = evaluation_logging.log_figures(stage, labels, probabilities, threshold, judged.counts,
                                                     judged.evaluation, dataset)
            audit, gallery = evaluation_logging.audit_and_gallery(stage, model, dataset, test, probabilities,
                                                                  judged.cells, cfg, segment=segment,
                                                                  segmenter_name=segmenter_name)
            occluded, occlusion_note = evaluation_logging.occlusion(model, dataset, test, cfg, segment=segment,
                                                                    segmenter_name=segmenter_name, whole=probabilities)
            tracking.log_metrics(occlusion_metrics(occluded))
            mlflow.set_tag(OCCLUSION_TAG, (occlusion_note if occluded is None else
                                           occluded.reason or f"computed on {occluded.n} cases")[:500])
            mlflow.set_tags({AUDIT_TAG: "passed" if audit.passed else "failed", AUDIT_REASON_TAG: audit.reason[:500]})
            gate_lines = occlusion_gate_lines(cfg, occluded, occlusion_note, external)
            card = model_card.ModelCard(
                model_uri=cfg.model_uri,
                evaluate_run_id=run_id,
                train_run_id=source.train_run_id,
                data_source=f"{cfg.data or 'training dataset of the model'} ({dataset.root})",
                dataset_digest=dataset.digest,
                training_digest=training_digest,
                threshold=threshold,
                threshold_source="--threshold flag" if cfg.threshold >= 0 else "stored with the model, chosen on validation",
                metrics=judged.evaluation.metrics,
                reasons=judged.evaluation.reasons,
                model_version=f"{source.registered_name} v{source.version}" if source.version else "",
                model_id=source.model_id,
                positive_label=dataset.positive_class,
                negative_label=dataset.negative_label,
                n_test=len(test),
                details=model_card.evaluation_details(model_spec, cfg.n_bootstrap, cfg.seed, prevalence),
                figures=figures,
                gradcam=model_card.gallery_figure(gallery),
                audit=audit,
                external=[(r.name, r.folder, r.n, r.n_positive, r.n_dropped, card_values(r)) for r in external],
                external_warnings=external_warnings,
                occlusion=occluded,
                occlusion_note=occlusion_note,
                occlusion_figure=evaluation_logging.occlusion_figure(stage, occluded),
                occlusion_gate=tuple(gate_lines),
                notes=card_notes(labels, dataset, training_digest, overlap, mlflow_status),
            )
            mlflow.log_text(model_card.render_html(card), "report.html")
        finally:
            stage.close()

        print(summary_text(run_id, cfg.model_uri, judged.evaluation.metrics, threshold, len(test), audit.passed,
                           audit.reason, mlflow.get_artifact_uri("report.html")))
        for line in gate_lines:
            print(f"  {line}")
        return run_id


def occlusion_gate_lines(cfg: EvaluateConfig, occluded: OcclusionResult | None, note: str,
                         external: list) -> list[str]:
    """What promote's occlusion gate, at its defaults, says of the test split (what promote judges by
    default) and what its external_occlusion gate says of each external collection (judged only when
    promote is given the collection's folder: shown so that a model whose lungs carry its ranking at
    home but not on another hospital's films is seen before it is promoted)."""
    reason = occluded.reason if occluded is not None and occluded.reason else note
    evidence = Evidence(version="", metrics=occlusion_metrics(occluded), occlusion_note=reason or "failed: see the log",
                        occlusion_margin=cfg.occlusion_margin)
    lines = [f"promote's occlusion gate (its defaults), test split: {occlusion_gate(evidence, Gates()).reason}"]
    for result in external:  # Gates' defaults are PromoteConfig's, i.e. promote's
        collection = Evidence(version="", metrics=logged_metrics(result), occlusion_margin=cfg.occlusion_margin)
        verdict = external_occlusion_gate(collection, Gates(external=(result.name,))).reason
        lines.append(f"external {result.name}, judged by promote only with -P external=<its folder>: {verdict}")
    return lines


def audit_segmenter(cfg: EvaluateConfig, loaded):
    """(the segmenter's forward pass for test images the audit finds without a stored mask, its name),
    or (None, "") when there is none: the geometric prior is then used there, and the audit says so.

    A lung-view model's own carried segmenter comes first; else ``cfg.audit_lung_model`` resolved to
    the version it points at now. No segmenter there is not an error (many users never train one):
    a warning, and the prior.
    """
    if loaded.lung_masks is not None:
        return loaded.lung_masks, f"the model's own segmenter ({loaded.image_spec.lung_model})"
    if not cfg.audit_lung_model:
        return None, ""
    from cxrexp.lungs.segmenter import predict_masks
    from cxrexp.mlflow_edge.model_uri import (
        parse_model_uri,
        registered_version,
        version_uri,
    )
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

    uri = cfg.audit_lung_model
    if parse_model_uri(uri).registered:
        name, version = registered_version(uri)
        uri = version_uri(name, version) if version else ""
    try:
        if not uri:
            raise ModelNotFound(f"the registry has no version at {cfg.audit_lung_model!r}")
        segmenter, _ = load_segmenter(uri)
    except ModelNotFound as exc:
        log.warning("audit: no lung segmenter (%s); test images without a lung mask are scored against the "
                    "geometric prior (train one with -e segment, or pass -P audit_lung_model=...)", exc)
        return None, ""
    return (lambda images: predict_masks(segmenter, images)), uri


def score_external(cfg: EvaluateConfig, model, model_spec, threshold: float, dataset: PreparedDataset,
                   trained_on: PreparedDataset | None, *, lung_masks=None, segment=None,
                   segmenter_name: str = "") -> list[ExternalResult]:
    """Each ``cfg.external`` collection prepared with the model's image settings (under
    ``cfg.external_out_dir``; its folder is only read), training duplicates dropped, scored at ``threshold``,
    and put through the occlusion check.

    ``lung_masks`` is the segmenter the model carries (``LoadedClassifier.lung_masks``; None for a
    whole-image model), so external images get the crop a served request gets, with no registry lookup.
    ``segment``/``segmenter_name``: the audit's segmenter (``audit_segmenter``), for the occlusion masks
    of images prepared without one."""
    from cxrexp.config import PreprocessConfig
    from cxrexp.data.pipeline import run_preprocess
    from cxrexp.data.tfdata import predict_probabilities

    reference = trained_on if trained_on is not None else dataset
    seen = reference.manifest[reference.manifest["split"].isin(["train", "val"])]
    results = []
    for name, folder in zip(collection_names(cfg.external), cfg.external):
        prepared = run_preprocess(PreprocessConfig(
            data_dir=folder, classes=(dataset.positive_class, dataset.negative_label),
            positive_class=dataset.positive_class, image=model_spec, out_dir=cfg.external_out_dir,
            near_dup_distance=int(reference.params.get("near_dup_distance", 48)),
            exclude=(),  # an external collection is scored whole: training's exclusions are about training
        ), progress=False, lung_masks=lung_masks)
        manifest = prepared.dataset.manifest
        dropped = training_duplicates(manifest["sha256"].tolist(), manifest["phash"].tolist(),
                                      seen["sha256"].tolist(), seen["phash"].tolist(),
                                      int(reference.params.get("near_dup_distance", 48)))
        kept = manifest[~dropped]
        labels = kept["label"].to_numpy(np.int64)
        probabilities = predict_probabilities(model, prepared.dataset.images(), kept["row"].to_numpy(np.int64),
                                              cfg.batch_size).astype(np.float64)
        evaluation = evaluate_predictions(labels, probabilities, threshold, n_bootstrap=cfg.n_bootstrap, seed=cfg.seed)
        occluded, _ = evaluation_logging.occlusion(  # a failure is logged there; the run records occlusion_n 0
            model, prepared.dataset, kept, cfg, segment=segment, segmenter_name=segmenter_name,
            label=f"external {name}", whole=probabilities)
        results.append(ExternalResult(name, folder, len(kept), int(labels.sum()), int(dropped.sum()),
                                      len(prepared.skipped), evaluation, occlusion=occluded))
        print(f"external {name} ({folder}): {len(kept)} images ({int(labels.sum())} {dataset.positive_class}), "
              f"{int(dropped.sum())} dropped as duplicates of training images, {len(prepared.skipped)} skipped; "
              f"ROC-AUC {evaluation.metrics['roc_auc']:.3f}, sensitivity {evaluation.metrics['sensitivity']:.3f}, "
              f"specificity {evaluation.metrics['specificity']:.3f}")
    return results


def _tag_model(cfg: EvaluateConfig, source: ModelSource, training_digest: str) -> None:
    """The tags that say which model was judged and what it was trained on."""
    mlflow.set_tags({
        MODEL_URI_TAG: cfg.model_uri,
        MODEL_ID_TAG: source.model_id,
        REGISTERED_MODEL_TAG: source.registered_name,
        MODEL_VERSION_TAG: source.version,
        TRAIN_RUN_TAG: source.train_run_id,
        TRAINING_DIGEST_TAG: training_digest,
        THRESHOLD_SOURCE_TAG: "flag" if cfg.threshold >= 0 else "model",
    })


__all__ = ["resolve_data", "run", "training_dataset"]
