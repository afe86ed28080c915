"""What each step's MLflow run is called: names that say what ran, so runs compare at a glance in the UI.

Pure (configs in, text out); ``tracking.step_run`` applies them, also to a run ``mlflow run`` created
under a random name (``whimsical-mole-867``). Trials keep ``trial-007`` (``tuning.trial``).
"""

from __future__ import annotations

from pathlib import PurePath

from cxrexp.config import PreprocessConfig, PromoteConfig, SegmentConfig, TrainConfig


def _data_name(data_dir: str) -> str:
    if not data_dir:
        return "synthetic"
    return PurePath(data_dir.rstrip("/\\")).name or data_dir


def preprocess_name(cfg: PreprocessConfig) -> str:
    """``preprocess cxr-mini 128px clahe lungs=crop``: the data, the size, the enhancement and the view."""
    return f"preprocess {_data_name(cfg.data_dir)} {cfg.image.image_size}px {cfg.image.enhance} lungs={cfg.image.lungs}"


def train_name(cfg: TrainConfig, image_size: int) -> str:
    """``train 128px default`` (+ ``seed=1`` when not the default seed, ``bn`` with batch norm)."""
    extras = [f"seed={cfg.seed}"] if cfg.seed != TrainConfig.seed else []
    if cfg.batch_norm:
        extras.append("bn")
    return " ".join([f"train {image_size}px {cfg.preset}", *extras])


def study_name(cfg: TrainConfig, image_size: int) -> str:
    """``study cnn-search 128px``: the parent run of a search (its trials are ``trial-007``)."""
    return f"study {cfg.study_name} {image_size}px"


def joined_study_name(cfg: TrainConfig, image_size: int) -> str:
    """``study cnn-search 128px (joined)``: an invocation whose trials sit under the study's existing parent."""
    return f"{study_name(cfg, image_size)} (joined)"


def evaluate_name(model: str, dataset_digest: str) -> str:
    """``evaluate cxr-covid-cnn v3 on 6cf9af66``: which model, on which prepared data."""
    return f"evaluate {model} on {dataset_digest[:8]}" if dataset_digest else f"evaluate {model}"


def segment_name(cfg: SegmentConfig) -> str:
    """``segment cxr-masks+lung-seg-nlm 128px`` (``synthetic`` without mask folders; `` separable``
    appended for that network, so the two builds are told apart in the runs table)."""
    sources = "+".join(_data_name(d) for d in cfg.mask_dirs) or "synthetic"
    return f"segment {sources} {cfg.image_size}px" + ("" if cfg.conv == "standard" else f" {cfg.conv}")


def promote_name(cfg: PromoteConfig) -> str:
    return f"promote {cfg.registered_model_name}"


__all__ = ["evaluate_name", "preprocess_name", "promote_name", "segment_name", "study_name", "train_name"]
