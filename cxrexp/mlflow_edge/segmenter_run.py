"""A segment run: train the lung U-Net on (image, mask) pairs as one MLflow run, register it (MLflow edge).

What it logs:

- params: the ``SegmentConfig``; metrics per epoch ``loss``, ``val_loss``, ``dice``, ``val_dice``
  (soft Dice at the model's size, on the validation split that drives early stopping);
- on the held-out test split (never seen by early stopping), each mask predicted at the model's
  size and resized to its image's own size: ``test_dice``, ``test_iou`` (means over images),
  ``test_dice_<source>``, ``test_iou_<source>``, ``n_test_<source>``, and ``test/scores.csv``;
- ``figures/test_best_worst.png``: the three best and three worst held-out images, outlines of the
  predicted (yellow) and dataset (green) masks;
- ``data/pairs.csv`` (image, mask, source, split) and ``data/skipped.csv`` (path, reason);
- the segmenter model (``segmenter_serving``), registered as ``SegmentConfig.model_name`` (``cxr-lung-seg``
  when trained on real masks, ``cxr-lung-seg-synthetic`` on the built-in set's, unless named); the alias
  ``@champion`` moves to it when its test Dice is no worse than the champion's on the same test split
  (``promotion.segmenter_champion``), tags ``test_dice`` and ``test_split_digest`` on the version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from cxrexp.config import SegmentConfig
from cxrexp.data.mask_pairs import find_mask_pairs
from cxrexp.data.split import stratified_group_split
from cxrexp.data.store import stable_hash
from cxrexp.errors import DatasetError
from cxrexp.evaluation import plots
from cxrexp.evaluation.metrics import metric_key
from cxrexp.images.decode import (
    DEFAULT_MIN_SIDE,
    ImageRejected,
    decode_file,
    max_file_bytes,
    read_bytes,
    read_grey,
)
from cxrexp.lungs.masks import dice, iou, mask_for_image, overlay
from cxrexp.mlflow_edge import registry, run_names, tracking
from cxrexp.mlflow_edge.epoch_logging import MlflowEpochLogger
from cxrexp.mlflow_edge.model_uri import version_uri
from cxrexp.promotion import segmenter_champion
from cxrexp.tags import (
    CHAMPION,
    MODEL_URI_TAG,
    SEGMENT_STEP,
    SEGMENTER_CHAMPION_TAG,
    SEGMENTER_VERSION_TAG,
)

log = logging.getLogger(__name__)

SEGMENTER_LOGGED = ("loss", "val_loss", "dice", "val_dice")
SEGMENTER_RENAMES = {"soft_dice": "dice", "val_soft_dice": "val_dice"}


@dataclass
class Samples:
    """Decoded images (uint8 HxW), their masks (bool, same size), sources, names, content hashes."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    sources: list[str]
    names: list[str]
    mask_names: list[str]
    sha256: list[str]
    skipped: list[tuple[str, str]]


def load_samples(cfg: SegmentConfig) -> Samples:
    """The (image, mask) pairs of ``cfg.mask_dirs`` decoded, or the built-in synthetic set's masks."""
    import hashlib

    if not cfg.mask_dirs:
        from cxrexp.images import synthetic

        spec = synthetic.SyntheticSpec(count=cfg.synthetic_count, size=cfg.synthetic_size, seed=cfg.seed)
        made = list(synthetic.generate(spec))
        return Samples([m.image for m in made], [m.mask.astype(bool) for m in made], ["synthetic"] * len(made),
                       [f"synthetic://{cfg.seed}/{m.index}" for m in made], [""] * len(made),
                       [hashlib.sha256(m.image.tobytes()).hexdigest() for m in made], [])
    found = find_mask_pairs(cfg.mask_dirs, cfg.exclude)
    samples = Samples([], [], [], [], [], [], list(found.unpaired))
    for pair in found.pairs:
        try:
            data = read_bytes(pair.image, max_bytes=max_file_bytes(cfg.max_pixels))  # read once: hashed and decoded from the same bytes
            grey = decode_file(data, pair.image, max_pixels=cfg.max_pixels, min_side=DEFAULT_MIN_SIDE)
            mask = read_grey(pair.mask, max_pixels=cfg.max_pixels, min_side=1)
        except ImageRejected as err:
            samples.skipped.append((err.path or pair.image, err.reason))
            continue
        # Resized to its image, never the image to the mask, and thresholded after resizing.
        samples.images.append(grey)
        samples.masks.append(mask_for_image(mask, grey.shape))
        samples.sources.append(pair.source)
        samples.names.append(pair.image)
        samples.mask_names.append(pair.mask)
        samples.sha256.append(hashlib.sha256(data).hexdigest())
    return samples


def split_samples(samples: Samples, cfg: SegmentConfig) -> np.ndarray:
    """"train"/"val"/"test" per sample, stratified by source, identical files kept on one side."""
    sources = np.asarray(samples.sources)
    _, groups = np.unique(np.asarray(samples.sha256), return_inverse=True)
    splits = stratified_group_split(sources, groups, cfg.val_frac, cfg.test_frac, cfg.seed)
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    if min(counts.values()) == 0:
        raise DatasetError(f"segment: {len(sources)} usable pairs split into {counts}: every split needs images; "
                           "add mask folders or change val_frac/test_frac")
    return splits


def score_test(model, images: list[np.ndarray], masks: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(predicted masks at each image's size, Dice per image, IoU per image)."""
    from cxrexp.lungs.segmenter import predict_masks

    predicted = predict_masks(model, images)
    return (predicted, np.array([dice(p, t) for p, t in zip(predicted, masks)]),
            np.array([iou(p, t) for p, t in zip(predicted, masks)]))


def _best_worst_figure(images, predicted, masks, scores, names, n: int = 3):
    order = np.argsort(scores, kind="stable")
    picks = [("worst", i) for i in order[:n]] + [("best", i) for i in order[::-1][:n]]
    items = [(f"{kind}: Dice {scores[i]:.3f} {str(names[i]).rsplit('/', 1)[-1][:28]}",
              overlay(images[i], predicted[i], masks[i])) for kind, i in picks]
    return plots.gradcam_gallery(items, ncols=max(2, len(items)))


def run(cfg: SegmentConfig) -> str:
    """Train, score on the held-out split, log, register; returns the run id.

    Long: the run's script, one block per logged part in the order the module docstring lists them.
    """
    from cxrexp.lungs.segmenter import to_input, to_target, train_segmenter
    from cxrexp.mlflow_edge.segmenter_serving import log_segmenter_model

    samples = load_samples(cfg)
    if not samples.images:
        raise DatasetError(f"segment: no usable (image, mask) pair in {list(cfg.mask_dirs)} "
                           f"({len(samples.skipped)} skipped; first: {samples.skipped[:3]})")
    splits = split_samples(samples, cfg)
    test_rows = np.flatnonzero(splits == "test")
    split_digest = stable_hash({"test": sorted(samples.sha256[i] for i in test_rows)})
    for path, reason in samples.skipped[:20]:
        print(f"skipped {path}: {reason}")
    with tracking.step_run(SEGMENT_STEP, cfg, run_name=run_names.segment_name(cfg),
                           extra_params={"n_pairs": len(samples.images)}) as active:
        run_id = active.info.run_id
        table = pd.DataFrame({"image": samples.names, "mask": samples.mask_names, "source": samples.sources,
                              "split": splits})
        tracking.log_frame(table, "data/pairs.csv")
        tracking.log_frame(pd.DataFrame(samples.skipped, columns=["path", "reason"]), "data/skipped.csv")
        tracking.log_metrics({"n_skipped": len(samples.skipped),
                              **{f"n_{s}": int((splits == s).sum()) for s in ("train", "val", "test")}})
        pick = {s: np.flatnonzero(splits == s) for s in ("train", "val")}
        xs = {s: to_input([samples.images[i] for i in rows], cfg.image_size) for s, rows in pick.items()}
        ys = {s: to_target([samples.masks[i] for i in rows], cfg.image_size) for s, rows in pick.items()}
        logger = MlflowEpochLogger(run_id, logged=SEGMENTER_LOGGED, renames=SEGMENTER_RENAMES)
        result = train_segmenter(xs["train"], ys["train"], xs["val"], ys["val"], epochs=cfg.epochs,
                                 batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, patience=cfg.patience,
                                 base_filters=cfg.base_filters, conv=cfg.conv, seed=cfg.seed, callbacks=(logger,), verbose=2)
        test_images = [samples.images[i] for i in test_rows]
        test_masks = [samples.masks[i] for i in test_rows]
        predicted, dices, ious = score_test(result.model, test_images, test_masks)
        test_sources = np.asarray(samples.sources)[test_rows]
        values = {"test_dice": float(dices.mean()), "test_iou": float(ious.mean()),
                  "best_epoch": result.best_epoch, "best_val_dice": result.best_val_dice}
        for source in sorted(set(test_sources)):
            key = metric_key(source)
            chosen = test_sources == source
            values.update({f"test_dice_{key}": float(dices[chosen].mean()), f"test_iou_{key}": float(ious[chosen].mean()),
                           f"n_test_{key}": int(chosen.sum())})
        tracking.log_metrics(values)
        tracking.log_frame(pd.DataFrame({"image": [samples.names[i] for i in test_rows], "source": test_sources,
                                         "dice": dices, "iou": ious}), "test/scores.csv")
        tracking.log_figure(_best_worst_figure(test_images, predicted, test_masks, dices,
                                               [samples.names[i] for i in test_rows]), "figures/test_best_worst.png")
        tracking.log_figure(plots.learning_curves_figure({"loss": result.history["loss"],
                                                          "val_loss": result.history["val_loss"]}),
                            "figures/learning_curves.png")
        info = log_segmenter_model(result.model, extra_metadata={"train_run_id": run_id, "test_dice": values["test_dice"],
                                                                  "test_split_digest": split_digest})
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        version = registry.register(info.model_uri, cfg.model_name, alias=None,
                                    tags={"test_dice": round(values["test_dice"], 6), "test_split_digest": split_digest,
                                          "train_run_id": run_id})
        champion = registry.get_alias_version(cfg.model_name, CHAMPION)
        move, reason = segmenter_champion(
            values["test_dice"], split_digest,
            float(champion.tags["test_dice"]) if champion is not None and "test_dice" in champion.tags else None,
            champion.tags.get("test_split_digest") if champion is not None else None,
        )
        if move:
            MlflowClient().set_registered_model_alias(cfg.model_name, CHAMPION, version)
        mlflow.set_tags({SEGMENTER_VERSION_TAG: version, SEGMENTER_CHAMPION_TAG: reason[:500]})
        print(f"segment run {run_id}: test Dice {values['test_dice']:.3f}, IoU {values['test_iou']:.3f} on "
              f"{len(test_rows)} held-out images; " + ", ".join(
                  f"{s} {values['test_dice_' + metric_key(s)]:.3f}" for s in sorted(set(test_sources))))
        print(f"registered {cfg.model_name} version {version}; {reason}")
        return run_id


def ensure(cfg: SegmentConfig) -> str:
    """The version URI (``models:/<name>/<v>``) of the segmenter ``cfg`` trains: from a finished
    segment run with the same parameters (and commit), or from a new one."""
    found = tracking.find_finished_run(SEGMENT_STEP, cfg)
    if found is not None:
        print(f"reusing segment run {found.info.run_id}")
        run_id = found.info.run_id
    else:
        with tracking.outside_project_run():
            run_id = run(cfg)
    return registered_uri(cfg, run_id)


def registered_uri(cfg: SegmentConfig, run_id: str) -> str:
    """The version URI (``models:/<name>/<v>``) the finished segment run ``run_id`` registered."""
    return version_uri(cfg.model_name, mlflow.get_run(run_id).data.tags[SEGMENTER_VERSION_TAG])


__all__ = ["Samples", "ensure", "load_samples", "registered_uri", "run", "score_test", "split_samples"]
