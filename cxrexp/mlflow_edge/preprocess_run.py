"""A preprocess run: ``pipeline.run_preprocess`` as one MLflow run, and finding one to reuse (MLflow edge).

Here rather than in ``steps/`` because three steps need it: ``preprocess`` runs it, ``train`` with no
``data`` reuses or runs it (``ensure``), ``main`` asks whether a finished one can be reused.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import mlflow
import numpy as np

from cxrexp.config import ImageSpec, PreprocessConfig
from cxrexp.data.pipeline import (
    BackgroundLungMasks,
    LungMasks,
    PreprocessResult,
    prepared_key,
    run_preprocess,
)
from cxrexp.data.store import PreparedDataset
from cxrexp.errors import ModelNotFound, PreparedDataError
from cxrexp.evaluation.metrics import metric_key
from cxrexp.images import decode, synthetic, transforms
from cxrexp.mlflow_edge import run_names, tracking
from cxrexp.mlflow_edge.model_uri import (
    parse_model_uri,
    registered_version,
    version_uri,
)
from cxrexp.tags import LUNG_FALLBACK_WARNING_TAG, LUNG_MODEL_TAG, REUSED_PREPARED_TAG

log = logging.getLogger(__name__)


def resolve_lungs(cfg: PreprocessConfig) -> PreprocessConfig:
    """``cfg`` with the segmenter named by the version it resolves to now (an alias moves; a version
    does not), or with no segmenter at all for ``lungs=none``; ``ModelNotFound`` when there is none."""
    spec = cfg.image
    if spec.lungs == "none":
        return replace(cfg, image=replace(spec, lung_model=""))
    parsed = parse_model_uri(spec.lung_model)
    if not parsed.registered:
        return cfg  # a run, a logged model or a folder is already one fixed model
    name, version = registered_version(spec.lung_model)
    if not version:
        raise ModelNotFound(
            f"lungs={spec.lungs} cuts every film to its lungs with the lung segmenter {spec.lung_model!r}, and "
            "the registry has no such version: train one on folders with lung masks with `mlflow run . -e "
            "segment --env-manager local -P mask_dirs=<folders>` (the COVID-19 Radiography Database ships "
            "them; `main` does this for you), pass -P lung_model=<a segmenter URI>, or use whole images "
            "with -P lungs=none"
        )
    return replace(cfg, image=replace(spec, lung_model=version_uri(name, version)))


def lung_masks_for(spec: ImageSpec) -> LungMasks | None:
    """The segmenter's forward pass for a resolved spec (None with ``lungs=none``)."""
    if spec.lungs == "none":
        return None
    from cxrexp.lungs.segmenter import (
        predict_masks,  # TensorFlow: only when a lung view needs it
    )
    from cxrexp.mlflow_edge.segmenter_serving import load_segmenter

    model, _ = load_segmenter(spec.lung_model)
    return lambda images: predict_masks(model, images)


def prepare(cfg: PreprocessConfig, *, progress: bool = True) -> PreprocessResult:
    """``run_preprocess`` with the segmenter resolved, and loaded while the workers decode (no MLflow run of its own)."""
    resolved = resolve_lungs(cfg)
    masks = None if resolved.image.lungs == "none" else BackgroundLungMasks(lambda: lung_masks_for(resolved.image))
    return run_preprocess(resolved, progress=progress, lung_masks=masks)


def lung_metrics(dataset: PreparedDataset) -> dict[str, float]:
    """Lung-view figures of a prepared dataset: crop and fallback counts (overall and per class), mean
    lung area, and the segmenter's Dice against the dataset masks where there are any."""
    manifest = dataset.manifest
    if "lung_crop" not in manifest:
        return {}
    fell_back = ~manifest["lung_crop"].astype(bool)
    metrics = {
        "n_lung_crop": int((~fell_back).sum()),
        "n_lung_fallback": int(fell_back.sum()),
        "lung_fallback_rate": float(fell_back.mean()) if len(manifest) else float("nan"),
        "lung_area_mean": float(manifest["lung_area"].mean()),
    }
    for name, count in dataset.params.get("lung_fallbacks", {}).items():
        metrics[f"n_lung_fallback_{metric_key(str(name))}"] = int(count)
    scored = manifest["seg_dice"].dropna()
    if len(scored):
        metrics.update(seg_dice_vs_dataset=float(scored.mean()), n_seg_dice=len(scored))
    return metrics


def summary_metrics(dataset: PreparedDataset, n_skipped: int) -> dict[str, float]:
    manifest = dataset.manifest
    metrics: dict[str, float] = {
        "n_images": len(manifest),
        "n_skipped": n_skipped,
        "n_duplicate_groups": dataset.params.get("n_duplicate_groups", 0),
        "n_with_mask": int(manifest["has_mask"].sum()),
        "prevalence": float(manifest["label"].mean()) if len(manifest) else float("nan"),
    }
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        metrics[f"n_{split}"] = len(part)
        metrics[f"n_{split}_positive"] = int(part["label"].sum())
    for name, count in manifest["class_name"].value_counts().sort_index().items():
        metrics[f"n_class_{metric_key(str(name))}"] = int(count)
    return {**metrics, **lung_metrics(dataset)}


def _before_after(dataset: PreparedDataset, n: int = 4) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A few images as decoded (resized only) and as stored (resized and enhanced), one per class first."""
    manifest = dataset.manifest
    picks = manifest.groupby("class_name", sort=True).head(max(1, n // 2)).head(n)
    plain = replace(dataset.spec, enhance="none")
    stored = dataset.images()
    syn_params = dataset.params.get("synthetic")
    pairs = []
    for _, row in picks.iterrows():
        if syn_params:
            index = int(str(row["source"]).rsplit("/", 1)[-1])
            grey = synthetic.make_image(synthetic.SyntheticSpec(**syn_params), index).image
        else:
            try:
                grey = decode.read_grey(row["source"], max_pixels=int(dataset.params["max_pixels"]))
            except decode.ImageRejected as err:  # moved or rewritten since, or a name shown escaped
                log.warning("before/after figure: %s left out (%s)", row["source"], err.reason)
                continue
        title = f"{row['class_name']}: {str(row['source']).rsplit('/', 1)[-1]}"
        pairs.append((title, transforms.prepare(grey, plain), np.asarray(stored[int(row["row"])])))
    return pairs


def log_result(cfg: PreprocessConfig, result: PreprocessResult) -> None:
    dataset = result.dataset
    skipped = result.skipped
    mlflow.log_metrics(summary_metrics(dataset, len(skipped)))
    mlflow.log_metric("seconds", result.seconds)
    mlflow.set_tag(REUSED_PREPARED_TAG, str(result.reused).lower())
    mlflow.set_tag(LUNG_MODEL_TAG, dataset.spec.lung_model if dataset.spec.lungs != "none" else "")
    warning = dataset.params.get("lung_fallback_warning")
    if warning:
        mlflow.set_tag(LUNG_FALLBACK_WARNING_TAG, warning[:5000])
    tracking.log_prepared_dataset(dataset, context="preprocess")
    mlflow.log_artifact(str(dataset.root / "manifest.csv"), artifact_path="data")
    mlflow.log_artifact(str(dataset.root / "skipped.csv"), artifact_path="data")
    mlflow.log_artifact(str(dataset.root / "params.json"), artifact_path="data")
    try:
        from cxrexp.evaluation import (
            plots,  # matplotlib and scikit-learn: seconds of imports, only for this figure
        )

        tracking.log_figure(plots.enhancement_panel(_before_after(dataset)), "figures/enhancement.png")
    except Exception as err:  # noqa: BLE001 - a figure must not cost the user the prepared data
        log.warning("could not draw the enhancement figure: %s", err)


def report(result: PreprocessResult) -> str:
    dataset = result.dataset
    skipped = result.skipped
    m = dataset.manifest
    lines = [
        f"prepared dataset: {dataset.root}",
        f"  digest {dataset.digest}{' (reused: same data and parameters)' if result.reused else ''}",
        f"  {len(m)} images ({', '.join(f'{k}: {v}' for k, v in m['class_name'].value_counts().sort_index().items())}), "
        f"train/val/test {', '.join(str(int((m['split'] == s).sum())) for s in ('train', 'val', 'test'))}, "
        f"{dataset.params.get('n_duplicate_groups', 0)} duplicate groups",
    ]
    if len(skipped):
        lines.append(f"  skipped {len(skipped)} file(s) (see skipped.csv):")
        lines += [f"    {row.path}: {row.reason}" for row in skipped.head(20).itertuples()]
        if len(skipped) > 20:
            lines.append(f"    ... and {len(skipped) - 20} more")
    for note in dataset.params.get("notes", []):
        lines.append(f"  note: {note}")
    lung = lung_metrics(dataset)
    if lung:
        spec = dataset.spec
        lines.append(f"  lungs={spec.lungs} with {spec.lung_model}: cropped {lung['n_lung_crop']}, fell back to the "
                     f"whole image {lung['n_lung_fallback']} ({dataset.params.get('lung_fallbacks', {})}; reasons "
                     "in manifest.csv, lung_fallback_reason)"
                     + (f"; segmenter Dice vs dataset masks {lung['seg_dice_vs_dataset']:.3f} on {lung['n_seg_dice']}"
                        if "seg_dice_vs_dataset" in lung else ""))
        if dataset.params.get("lung_fallback_warning"):
            lines.append(f"  WARNING: {dataset.params['lung_fallback_warning']}")
    return "\n".join(lines)


def run(cfg: PreprocessConfig) -> str:
    """Preprocess as one MLflow run (tagged ``cxrexp.step=preprocess``); returns the run id."""
    with tracking.step_run("preprocess", cfg, run_name=run_names.preprocess_name(cfg)) as active:
        result = prepare(cfg)
        log_result(cfg, result)
        print(report(result))
        print(f"preprocess run id: {active.info.run_id}")
        return active.info.run_id


def _reusable(cfg: PreprocessConfig) -> tuple[str, PreparedDataset] | None:
    """(run id, its prepared dataset) of a finished preprocess run with these parameters whose prepared
    data is still there and was made from the same files; None when preprocess has to run."""
    previous = tracking.find_finished_run("preprocess", cfg)
    if previous is None:
        return None
    try:
        dataset = tracking.resolve_prepared(previous.info.run_id)
    except PreparedDataError as err:
        log.warning("preprocess run %s cannot be reused (%s); running preprocess again", previous.info.run_id, err)
        return None
    # Same parameters is not enough for a data folder: files may have been added or replaced, and the
    # segmenter's alias may have moved.
    if dataset.root.name != prepared_key(resolve_lungs(cfg)):
        print(f"preprocess run {previous.info.run_id} was made from other files; running preprocess again")
        return None
    return previous.info.run_id, dataset


def reusable_run(cfg: PreprocessConfig) -> str | None:
    """The run id ``_reusable`` finds (the main pipeline needs only the id); None when preprocess has to run."""
    found = _reusable(cfg)
    return found[0] if found is not None else None


def ensure(cfg: PreprocessConfig) -> PreparedDataset:
    """The prepared dataset for ``cfg``: from a reusable preprocess run, or a new run."""
    found = _reusable(cfg)
    if found is not None:
        run_id, dataset = found
        print(f"reusing preprocess run {run_id} ({dataset.root})")
        return dataset
    with tracking.outside_project_run():
        run_id = run(cfg)
    return tracking.resolve_prepared(run_id)
