"""The prepared-dataset format on disk: an atomic writer and a validating reader.

Layout of one prepared dataset (``<out_dir>/<cache_key>/``)::

    COMPLETE       written last, holds the digest; a folder without it is not a dataset
    params.json    image spec, classes, split settings, source, digest
    manifest.csv   one row per usable image (see MANIFEST_COLUMNS)
    images.npy     uint8 (capacity, S, S); manifest column ``row`` indexes it
    masks.npy      uint8 (capacity, S, S) in {0, 1}; zeros where ``has_mask`` is False
    skipped.csv    path, reason

Why uint8 ``.npy``: it memory-maps, so the tf.data pipeline gathers a batch of rows without decoding
anything. The writer streams rows in with positioned writes (``os.pwrite``), not through a memory
map: pages written through a map stay counted in the writer's resident memory until it unmaps, so
a map would make the preprocess step's memory grow with the dataset. Rows of skipped files stay as
zero-filled (sparse) holes; they cost nothing and keep row = discovery order.

The writer builds everything in a hidden temporary sibling folder (``.<key>.tmp-<pid>-<random>``)
and renames it into place only on success, so an interrupted or failed run never leaves a folder
that looks valid. A live writer holds an flock on ``WRITING`` inside its temporary folder; the next
writer of any key removes the temporary folders whose lock nobody holds (their writer died, however it
died). The check-and-rename at the end runs under a per-key lock (``.<key>.lock``, an empty file kept
on purpose), so runs finishing the same key at once keep exactly one result and never delete each
other's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxrexp.config import ImageSpec
from cxrexp.data.split import SPLITS
from cxrexp.errors import PreparedDataError

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
# Only in datasets prepared with a lung view (spec.lungs != "none"), after MANIFEST_COLUMNS: whether
# the crop was applied, the lung share of the working image, why the crop fell back, where the stored
# mask came from (dataset | segmenter) and the segmenter's Dice against the dataset mask (NaN if none).
LUNG_COLUMNS = ["lung_crop", "lung_area", "lung_fallback_reason", "mask_source", "seg_dice"]
FORMAT_VERSION = 1


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
    # One "sha256|label|split" line per row (a row-wise DataFrame.agg does the same 100x slower).
    columns = [manifest[name].astype(str).tolist() for name in ("sha256", "label", "split")]
    content = ["|".join(values) for values in zip(*columns)]
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
        return ImageSpec.from_stored(self.params["image_spec"])

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


_REQUIRED_FILES = ("params.json", "manifest.csv", "images.npy", "masks.npy", "skipped.csv")
# Read as text: a perceptual hash such as "0000123400001234" or "12e4000000000000" would otherwise
# come back as a number (leading zeros lost, or a float), and a class called "1" as an int.
_TEXT_COLUMNS = {"source": str, "class_name": str, "split": str, "sha256": str, "phash": str, "patient_id": "string"}


def open_prepared(path: str | os.PathLike[str]) -> PreparedDataset:
    """Open and validate a prepared dataset folder; errors say what is wrong and how to fix it.

    Checks the COMPLETE marker, the files, the format version, the manifest columns and that
    images.npy/masks.npy are uint8 (capacity, S, S) with every manifest row inside them. Raises
    PreparedDataError otherwise. Pixels are not read (the arrays are memory-mapped on demand).
    """
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
    missing = [n for n in _REQUIRED_FILES if not (root / n).is_file()]
    if missing:
        raise PreparedDataError(f"prepared dataset {root} lacks {', '.join(missing)}; delete it and run preprocess again")
    try:
        params = json.loads((root / "params.json").read_text())
    except (OSError, ValueError) as err:
        raise PreparedDataError(f"{root / 'params.json'} is unreadable ({err}); delete the folder and run preprocess again") from err
    if not isinstance(params, dict) or params.get("format_version") != FORMAT_VERSION:
        found = params.get("format_version") if isinstance(params, dict) else None
        raise PreparedDataError(
            f"prepared dataset {root} has format_version {found}, this cxrexp reads "
            f"{FORMAT_VERSION}; run preprocess again"
        )
    try:
        manifest = pd.read_csv(root / "manifest.csv", dtype=_TEXT_COLUMNS, keep_default_na=False)
    except (OSError, ValueError) as err:  # pandas' parser errors are ValueErrors
        raise PreparedDataError(f"{root / 'manifest.csv'} is unreadable ({err}); delete the folder and run preprocess again") from err
    if list(manifest.columns) not in (MANIFEST_COLUMNS, MANIFEST_COLUMNS + LUNG_COLUMNS):
        raise PreparedDataError(
            f"{root / 'manifest.csv'} has columns {list(manifest.columns)}, expected {MANIFEST_COLUMNS} "
            f"(plus {LUNG_COLUMNS} with a lung view); run preprocess again"
        )
    manifest["has_mask"] = _bools(manifest["has_mask"])
    if "lung_crop" in manifest:
        manifest["lung_crop"] = _bools(manifest["lung_crop"])
        for name in ("lung_area", "seg_dice"):
            manifest[name] = pd.to_numeric(manifest[name], errors="coerce")
    dataset = PreparedDataset(root=root, params=params, manifest=manifest)
    size = dataset.image_size
    needed_rows = int(manifest["row"].max()) + 1 if len(manifest) else 0
    for name in ("images.npy", "masks.npy"):
        try:
            array = np.load(root / name, mmap_mode="r")  # reads the header only
        except (OSError, ValueError) as err:
            raise PreparedDataError(f"{root / name} is unreadable ({err}); delete the folder and run preprocess again") from err
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1:] != (size, size) or len(array) < needed_rows:
            raise PreparedDataError(
                f"{root / name} holds {array.dtype} {array.shape}, expected uint8 (>= {needed_rows}, {size}, {size}) "
                "as params.json and manifest.csv say; delete the folder and run preprocess again"
            )
        del array
    return dataset


def _is_valid(path: Path) -> bool:
    try:
        open_prepared(path)
    except PreparedDataError:
        return False
    return True


# Held (flock) by a live writer for as long as its temporary folder exists: the kernel drops the lock
# when the process dies, however it dies, so "can I take it?" tells a dead writer's leftovers from a
# live one's work without trusting pids (reused, and meaningless across machines sharing out_dir).
WRITER_LOCK = "WRITING"
# A temporary folder without a lock file is either being created this instant or was left by a
# cxrexp from before the lock existed; only the second kind is old.
_UNLOCKED_GRACE_SECONDS = 3600


def _writer_gone(folder: Path) -> bool:
    """True when no live writer holds ``folder``'s lock (see WRITER_LOCK)."""
    try:
        fd = os.open(folder / WRITER_LOCK, os.O_RDONLY)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > _UNLOCKED_GRACE_SECONDS
        except OSError:
            return False
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: a live writer holds it
        return False
    finally:
        os.close(fd)
    return True


def _remove_stale_temp(parent: Path) -> None:
    """Remove the temporary folders (``.<key>.tmp-*``) and set-aside old copies (``.<key>.old-*``) of
    writers that are gone, for every key in ``parent``: a killed run's half-written dataset can be
    as large as a finished one, and nothing else would ever delete it."""
    for entry in parent.glob(".*.tmp-*"):
        if entry.is_dir() and _writer_gone(entry):
            shutil.rmtree(entry, ignore_errors=True)
    for entry in parent.glob(".*.old-*"):
        try:
            old = entry.is_dir() and time.time() - entry.stat().st_mtime > _UNLOCKED_GRACE_SECONDS
        except OSError:  # removed meanwhile by another writer's cleanup
            continue
        if old:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def _key_lock(parent: Path, key: str) -> Iterator[None]:
    """Serialise the check-and-rename of one key between processes (and machines, where the file
    system's flock reaches them), so two runs finishing the same key at once keep exactly one result
    and neither deletes the other's."""
    fd = os.open(parent / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class RowWriter:
    """Writes row ``r`` of ``images.npy``/``masks.npy`` in place, by position (``os.pwrite``).

    Picklable and fork-safe: file descriptors are opened lazily by whichever process writes, so
    pool workers can store their own results and send the parent only a few hashes (moving the
    pixels through the pool's pipe cost the parent about a tenth of the decoding's CPU). Rows never
    overlap, so processes need no lock.
    """

    def __init__(self, paths: dict[str, str], offsets: dict[str, int], image_size: int, capacity: int):
        self.paths = dict(paths)  # "images"/"masks" -> .npy path
        self.offsets = dict(offsets)  # byte offset of row 0 (after the .npy header)
        self.image_size = int(image_size)
        self.capacity = int(capacity)
        self._fds: dict[str, int] = {}
        self._owner: int | None = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_owner": None}

    def _fd(self, name: str) -> int:
        if self._owner != os.getpid():  # a forked or unpickled copy: inherited descriptors are not ours
            self._fds, self._owner = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.paths[name], os.O_WRONLY)
        return fd

    def _put(self, name: str, row: int, array: np.ndarray, what: str) -> None:
        size = self.image_size
        if array.dtype != np.uint8 or array.shape != (size, size):
            raise ValueError(
                f"{what} for row {row} is {array.dtype} {array.shape}; the dataset stores uint8 ({size}, {size})"
            )
        data = np.ascontiguousarray(array).tobytes()
        if os.pwrite(self._fd(name), data, self.offsets[name] + row * size * size) != len(data):
            raise OSError(f"short write to {self.paths[name]} (disk full?)")

    def write(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Store row ``row``: image uint8 (S, S); mask uint8 (S, S) in {0, 1} or None (row stays zeros)."""
        if not 0 <= row < self.capacity:
            raise IndexError(f"row {row} is outside 0..{self.capacity - 1}")
        self._put("images", row, image, "image")
        if mask is not None:
            self._put("masks", row, mask, "mask")

    def close(self) -> None:
        """Close the descriptors this process opened (a forked copy leaves the parent's alone)."""
        fds = self._fds if self._owner == os.getpid() else {}
        self._fds = {}
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


class DatasetWriter:
    """Builds one prepared dataset in a temporary folder; ``finish`` writes the tables and renames the
    folder into place.

    Rows go in through ``write``, or through ``rows`` (a RowWriter that pool workers can use). Use as
    a context manager: leaving the block with an exception removes the temporary folder, and so does
    a failing ``finish``. Memory use does not grow with ``capacity`` (see the module docstring).
    """

    def __init__(self, out_dir: str | os.PathLike[str], key: str, capacity: int, image_size: int):
        self.final = Path(out_dir).expanduser().resolve() / key
        self.final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp(self.final.parent)
        # Not tempfile.mkdtemp: its 0700 mode would follow the rename and hide the dataset from
        # other users; mkdir honours the umask like any other folder.
        self.tmp = self.final.parent / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp.mkdir()
        self._lock_fd: int | None = os.open(self.tmp / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self.image_size = int(image_size)
        self.capacity = max(int(capacity), 1)
        try:
            paths = {name: str(self.tmp / f"{name}.npy") for name in ("images", "masks")}
            offsets = {name: self._create(Path(path)) for name, path in paths.items()}
        except BaseException:
            self.abort()
            raise
        self.rows = RowWriter(paths, offsets, self.image_size, self.capacity)

    def _create(self, path: Path) -> int:
        """Write an all-zero uint8 (capacity, S, S) .npy (sparse: holes cost no disk); returns its data offset."""
        shape = (self.capacity, self.image_size, self.image_size)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            offset = handle.tell()
            handle.truncate(offset + self.capacity * self.image_size * self.image_size)
        return offset

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def write(self, row: int, image: np.ndarray, mask: np.ndarray | None) -> None:
        """Store row ``row``: image uint8 (S, S); mask uint8 (S, S) in {0, 1} or None (row stays zeros)."""
        self.rows.write(row, image, mask)

    def abort(self) -> None:
        """Drop everything written so far (safe to call twice, or after ``finish``)."""
        rows = getattr(self, "rows", None)
        if rows is not None:
            rows.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._unlock()

    def _unlock(self) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def _publish(self) -> None:
        """Rename the finished temporary folder into place (the caller holds the key's lock)."""
        if _is_valid(self.final):  # a concurrent run finished the same key first: keep theirs
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():  # damaged, half-deleted or left by an older version
            # Moved aside first: a directory cannot be renamed onto a non-empty one.
            trash = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.old-{os.getpid()}-", dir=self.final.parent))
            os.replace(self.final, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(self.tmp, self.final)
        except OSError as err:
            # Where flock does not reach (some network file systems) another writer can still get
            # there first: rename refuses a non-empty target, so theirs is kept if it is valid.
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _is_valid(self.final):
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)

    def finish(self, manifest: pd.DataFrame, params: dict[str, Any], skipped: pd.DataFrame) -> PreparedDataset:
        """Write manifest/skipped/params (with the digest), then COMPLETE, then rename into place.

        When another process finished the same key first, its dataset is kept and returned.
        """
        try:
            self.rows.close()
            for path in self.rows.paths.values():  # fsync works per file, whichever process wrote the rows
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)  # a power cut must not leave a COMPLETE folder whose rows never reached the disk
                finally:
                    os.close(fd)
            manifest = manifest[MANIFEST_COLUMNS + [c for c in LUNG_COLUMNS if c in manifest]]
            params = {**params, "format_version": FORMAT_VERSION}
            params["digest"] = dataset_digest(manifest, params)
            manifest.to_csv(self.tmp / "manifest.csv", index=False)
            skipped.to_csv(self.tmp / "skipped.csv", index=False)
            (self.tmp / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True, default=_json_default))
            (self.tmp / "COMPLETE").write_text(params["digest"] + "\n")
            (self.tmp / WRITER_LOCK).unlink()  # the folder is about to become the dataset; the fd keeps the lock
            with _key_lock(self.final.parent, self.final.name):
                self._publish()
        except BaseException:
            self.abort()
            raise
        self._unlock()
        return open_prepared(self.final)


def _bools(column: pd.Series) -> pd.Series:
    return column.astype(str).str.lower().isin(["true", "1"])


def spec_dict(spec: ImageSpec) -> dict[str, Any]:
    return spec.key_fields()
