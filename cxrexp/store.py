"""The prepared-dataset format on disk: an atomic writer and a validating reader.

Layout of one prepared dataset (``<out_dir>/<cache_key>/``)::

    COMPLETE       written last, holds the digest; a folder without it is not a dataset
    params.json    image spec, classes, split settings, source, digest
    manifest.csv   one row per usable image (see MANIFEST_COLUMNS)
    images.npy     uint8 (capacity, S, S); manifest column ``row`` indexes it
    masks.npy      uint8 (capacity, S, S) in {0, 1}; zeros where ``has_mask`` is False
    skipped.csv    path, reason

Why uint8 ``.npy``: it memory-maps, so the tf.data pipeline gathers a batch of rows without decoding
anything, and the writer streams rows in without holding the dataset in memory. Rows of skipped files
stay as zero-filled holes; they cost a few bytes and keep row = discovery order.

The writer builds everything in a hidden temporary sibling folder and renames it into place only on
success, so an interrupted or failed run never leaves a folder that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrexp.config import ImageSpec

MANIFEST_COLUMNS = [
    "row",
    "source",
    "class_name",
    "label",
    "split",
    "sha256",
    "phash",
    "dup_group",
    "group",
    "patient_id",
    "has_mask",
    "width",
    "height",
]
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1


class PreparedDataError(ValueError):
    """A prepared dataset is missing, incomplete or does not fit what asked for it."""


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {value!r}")


def stable_hash(payload: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable payload with sorted keys (stable across runs and machines)."""
    text = json.dumps(payload, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# Where the data happened to live, or when its files were touched, does not change what it is.
_NOT_IN_DIGEST = {"digest", "cache_key", "source", "notes", "layout"}


def dataset_digest(manifest: pd.DataFrame, params: dict[str, Any]) -> str:
    """Identifies a prepared dataset: the content hashes, labels and splits, plus the parameters."""
    params = {k: v for k, v in params.items() if k not in _NOT_IN_DIGEST}
    content = manifest[["sha256", "label", "split"]].astype(str).agg("|".join, axis=1)
    hasher = hashlib.sha256()
    hasher.update("\n".join(content).encode())
    hasher.update(json.dumps(params, sort_keys=True, default=_json_default).encode())
    return hasher.hexdigest()[:16]


@dataclass(frozen=True)
class PreparedDataset:
    """A complete prepared dataset on disk (opened read-only)."""

    root: Path
    params: dict[str, Any]
    manifest: pd.DataFrame

    @property
    def digest(self) -> str:
        return str(self.params["digest"])

    @property
    def spec(self) -> ImageSpec:
        return ImageSpec(**self.params["image_spec"])

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    @property
    def has_masks(self) -> bool:
        return bool(self.manifest["has_mask"].any())

    def images(self) -> np.ndarray:
        """Read-only memmap, uint8 (capacity, S, S); index it with manifest ``row``."""
        return np.load(self.root / "images.npy", mmap_mode="r")

    def masks(self) -> np.ndarray:
        """Read-only memmap, uint8 (capacity, S, S) in {0, 1}."""
        return np.load(self.root / "masks.npy", mmap_mode="r")

    def split_frame(self, name: str) -> pd.DataFrame:
        if name not in SPLITS:
            raise PreparedDataError(f"split {name!r} is not one of {SPLITS}")
        return self.manifest[self.manifest["split"] == name]

    def split_rows(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64[n] into images(), labels int64[n] with 1 = positive class) of one split."""
        frame = self.split_frame(name)
        return frame["row"].to_numpy(np.int64), frame["label"].to_numpy(np.int64)

    def skipped(self) -> pd.DataFrame:
        return pd.read_csv(self.root / "skipped.csv", keep_default_na=False)

    @property
    def positive_class(self) -> str:
        return str(self.params["positive_class"])

    @property
    def negative_label(self) -> str:
        negatives = [c for c in self.params["classes"] if c != self.positive_class]
        return negatives[0] if len(negatives) == 1 else "not " + self.positive_class


def open_prepared(path: str | os.PathLike[str]) -> PreparedDataset:
    """Open and validate a prepared dataset folder; errors say what is wrong and how to fix it."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise PreparedDataError(
            f"prepared dataset {root} does not exist: run `mlflow run . -e preprocess` first "
            "(or pass the preprocess run id as data)"
        )
    if not (root / "COMPLETE").is_file():
        raise PreparedDataError(
            f"prepared dataset {root} is incomplete (no COMPLETE marker: the preprocess run that "
            "wrote it did not finish); delete it and run preprocess again"
        )
    missing = [n for n in ("params.json", "manifest.csv", "images.npy", "masks.npy") if not (root / n).is_file()]
    if missing:
        raise PreparedDataError(f"prepared dataset {root} lacks {', '.join(missing)}; run preprocess again")
    params = json.loads((root / "params.json").read_text())
    if params.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"prepared dataset {root} has format {params.get('format_version')}, this cxrexp reads "
            f"{FORMAT_VERSION}; run preprocess again"
        )
    manifest = pd.read_csv(
        root / "manifest.csv", dtype={"patient_id": "string", "sha256": str}, keep_default_na=False
    )
    if list(manifest.columns) != MANIFEST_COLUMNS:
        raise PreparedDataError(f"{root / 'manifest.csv'} has columns {list(manifest.columns)}, expected {MANIFEST_COLUMNS}")
    manifest["phash"] = manifest["phash"].astype(str)
    manifest["has_mask"] = manifest["has_mask"].astype(str).str.lower().isin(["true", "1"])
    return PreparedDataset(root=root, params=params, manifest=manifest)


class DatasetWriter:
    """Streams rows into memmaps in a temporary folder; ``finish`` renames it into place.

    Use as a context manager: leaving the block with an exception removes the temporary folder.
    """

    def __init__(self, out_dir: str | os.PathLike[str], key: str, capacity: int, image_size: int):
        self.final = Path(out_dir).expanduser().resolve() / key
        self.tmp = self.final.parent / f".{key}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        shape = (max(capacity, 1), image_size, image_size)
        self.images = np.lib.format.open_memmap(self.tmp / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
        self.masks = np.lib.format.open_memmap(self.tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=shape)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        self.images[row] = image
        if mask is not None:
            self.masks[row] = mask

    def abort(self) -> None:
        self.images = self.masks = None  # type: ignore[assignment]
        shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, manifest: pd.DataFrame, params: dict[str, Any], skipped: pd.DataFrame) -> PreparedDataset:
        self.images.flush()
        self.masks.flush()
        self.images = self.masks = None  # type: ignore[assignment]
        manifest = manifest[MANIFEST_COLUMNS]
        params = {**params, "format_version": FORMAT_VERSION}
        params["digest"] = dataset_digest(manifest, params)
        manifest.to_csv(self.tmp / "manifest.csv", index=False)
        skipped.to_csv(self.tmp / "skipped.csv", index=False)
        (self.tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=_json_default))
        (self.tmp / "COMPLETE").write_text(params["digest"] + "\n")
        if (self.final / "COMPLETE").is_file():  # a concurrent run finished the same key first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            if self.final.exists():  # left by hand or by an older version: not a valid dataset
                shutil.rmtree(self.final)
            os.replace(self.tmp, self.final)
        return open_prepared(self.final)


def spec_dict(spec: ImageSpec) -> dict[str, Any]:
    return asdict(spec)
