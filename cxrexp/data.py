"""Find the images of a dataset tree, group duplicates and split without leakage.

Pure: this module lists folders and reads optional metadata spreadsheets, nothing else. It never
decodes an image and never writes a file (the dataset folder may be read-only or shared).

Layouts understood by :func:`discover`:

- ``kaggle`` (the "COVID-19 Radiography Database")::

      <root>/<Class>/images/<name>.png
      <root>/<Class>/masks/<name>.png          optional lung mask, same file name
      <root>/<Class>.metadata.xlsx             optional; FILE NAME, FORMAT, SIZE, URL (+ patient id)

- ``plain``: ``<root>/<Class>/<name>.png|jpg|jpeg`` (extensions in any case).

``<root>`` is ``data_dir`` itself or, when the archive was unpacked with its top folder
(``COVID-19_Radiography_Dataset/COVID/...``), the single sub-folder of ``data_dir`` that holds the
class folders.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Spreadsheets sit beside or inside class folders (the Kaggle metadata); OS droppings are not data.
_SPREADSHEET_EXTENSIONS = (".xlsx", ".xls", ".csv")
_OS_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
_FILE_NAME_COLUMNS = ("filename", "file", "imagename", "imagefile", "image", "imageid")
_PATIENT_COLUMNS = ("patientid", "patient")  # normalised: lower case, letters and digits only
SPLITS = ("train", "val", "test")
_UINT64_MASK = (1 << 64) - 1


class DatasetError(ValueError):
    """The dataset folder cannot be used as asked; the message names the path and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    """One image file found by :func:`discover`.

    ``path``/``mask_path`` are absolute (symlinks kept as given). ``class_name`` is the class name as
    requested (not the folder's spelling); ``label`` is 1 for the positive class, else 0.
    ``patient_id`` comes from the class's metadata file when it has a patient column, else None.
    """

    path: str
    class_name: str
    label: int
    mask_path: str | None
    patient_id: str | None


@dataclass(frozen=True)
class Discovery:
    """Records in class order (as requested), then natural file-name order; ``layout`` is
    ``"kaggle"``, ``"plain"`` or ``"mixed"``; ``notes`` are human sentences worth logging."""

    records: list[ImageRecord]
    layout: str
    notes: list[str]


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    # "COVID-2" before "COVID-10"; re.split keeps text at even and digits at odd positions, so the
    # tuples always compare str with str and int with int. The raw name breaks remaining ties.
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)) + (name,)


def _subdirs(folder: Path) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


def _is_ignored_file(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or lower in _OS_FILES or lower.endswith(_SPREADSHEET_EXTENSIONS)


def _list_files(folder: Path) -> tuple[list[str], int, int]:
    """(data file names in natural order, ignored non-data files, ignored sub-folders)."""
    names: list[str] = []
    ignored = subfolders = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                subfolders += not entry.name.startswith(".")
            elif _is_ignored_file(entry.name):
                ignored += 1
            elif entry.is_file():
                names.append(entry.name)
    return sorted(names, key=_natural_key), ignored, subfolders


def _match_folder(name: str, folders: Sequence[str]) -> tuple[str | None, list[str]]:
    """Exact match first, then case-insensitive; returns (match, ambiguous case-insensitive hits)."""
    if name in folders:
        return name, []
    hits = [f for f in folders if f.lower() == name.lower()]
    return (hits[0], []) if len(hits) == 1 else (None, hits)


def _find_root(data_dir: Path, classes: Sequence[str], notes: list[str]) -> Path:
    folders = _subdirs(data_dir)
    if any(_match_folder(c, folders)[0] for c in classes):
        return data_dir
    holders = [f for f in folders if any(_match_folder(c, _subdirs(data_dir / f))[0] for c in classes)]
    if len(holders) == 1:
        notes.append(f"class folders found one level down, in {data_dir / holders[0]}; using it as the root")
        return data_dir / holders[0]
    if len(holders) > 1:
        raise DatasetError(
            f"{data_dir}: several sub-folders hold class folders ({', '.join(holders)}); "
            "pass the one you mean as the data folder"
        )
    return data_dir


def _normalise_column(name: Any) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _file_key(value: str) -> str:
    """Metadata 'FILE NAME' or a file name -> the key both share: base name, no image extension, lower."""
    base = re.split(r"[\\/]", value.strip())[-1]
    if base.lower().endswith(IMAGE_EXTENSIONS):
        base = base[: base.rfind(".")]
    return base.lower()


def _clean_id(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _find_metadata(root: Path, folder: str, class_name: str) -> Path | None:
    wanted = [f"{stem}.metadata{ext}".lower() for ext in (".xlsx", ".csv") for stem in (folder, class_name)]
    with os.scandir(root) as entries:
        present = {e.name.lower(): e.name for e in entries if e.is_file()}
    for name in wanted:  # xlsx before csv: the Kaggle release ships xlsx
        if name in present:
            return root / present[name]
    return None


def _read_patient_ids(path: Path, notes: list[str]) -> dict[str, str]:
    """File key -> patient id from one metadata spreadsheet; problems become notes, never errors."""
    try:
        if path.suffix.lower() == ".xlsx":
            table = pd.read_excel(path, dtype=str)
        else:
            table = pd.read_csv(path, dtype=str)
    except Exception as err:  # any unreadable spreadsheet only costs the patient grouping
        notes.append(f"{path}: metadata not read ({type(err).__name__}: {err}); patient ids unknown")
        return {}
    columns = {_normalise_column(c): c for c in table.columns}
    file_col = next((columns[c] for c in _FILE_NAME_COLUMNS if c in columns), None)
    patient_col = next((columns[c] for c in _PATIENT_COLUMNS if c in columns), None)
    if patient_col is None:
        notes.append(
            f"{path.name}: no patient id column (columns: {', '.join(map(str, table.columns))}); "
            "splits group duplicates only"
        )
        return {}
    if file_col is None:
        notes.append(f"{path.name}: patient column {patient_col!r} but no file name column; patient ids unused")
        return {}
    mapping: dict[str, str] = {}
    for file_value, patient in zip(table[file_col], table[patient_col]):
        file_name, patient_id = _clean_id(file_value), _clean_id(patient)
        if file_name is not None and patient_id is not None:
            mapping.setdefault(_file_key(file_name), patient_id)  # first row wins on repeats
    return mapping


def _class_records(
    root: Path, folder: str, class_name: str, label: int, notes: list[str]
) -> tuple[list[ImageRecord], str]:
    class_dir = root / folder
    inner = _subdirs(class_dir)
    images_dir, _ = _match_folder("images", inner)
    if images_dir is not None:
        layout, image_dir = "kaggle", class_dir / images_dir
        loose, _, _ = _list_files(class_dir)
        if loose:
            notes.append(f"{class_name}: {len(loose)} files directly in {class_dir} ignored (images/ is used)")
    else:
        layout, image_dir = "plain", class_dir
    names, ignored, subfolders = _list_files(image_dir)
    if ignored:
        notes.append(f"{class_name}: {ignored} hidden, OS or spreadsheet files in {image_dir} ignored")
    if subfolders:
        notes.append(f"{class_name}: {subfolders} sub-folders of {image_dir} ignored (not searched recursively)")

    n_images = sum(n.lower().endswith(IMAGE_EXTENSIONS) for n in names)
    if n_images == 0:
        others = f" (only {len(names)} other files)" if names else ""
        raise DatasetError(
            f"class {class_name!r}: no .png/.jpg/.jpeg files in {image_dir}{others}; "
            "put the images there or drop the class from -P classes=..."
        )
    if n_images < len(names):
        notes.append(
            f"{class_name}: {len(names) - n_images} files without a .png/.jpg/.jpeg extension are listed; "
            "preprocessing keeps or rejects them by content"
        )

    masks: dict[str, str] = {}
    masks_dir, _ = _match_folder("masks", inner) if layout == "kaggle" else (None, [])
    if masks_dir is not None:
        mask_names, _, _ = _list_files(class_dir / masks_dir)
        masks = {m: str(class_dir / masks_dir / m) for m in mask_names}
        # Exact file name first; a case-only difference still pairs (copies made on Windows/macOS).
        masks.update({m.lower(): p for m, p in list(masks.items()) if m.lower() not in masks})

    patients: dict[str, str] = {}
    metadata = _find_metadata(root, folder, class_name)
    if metadata is not None:
        patients = _read_patient_ids(metadata, notes)

    records = [
        ImageRecord(
            path=str(image_dir / name),
            class_name=class_name,
            label=label,
            mask_path=masks.get(name) or masks.get(name.lower()),
            patient_id=patients.get(_file_key(name)),
        )
        for name in names
    ]
    if masks_dir is not None:
        paired = sum(r.mask_path is not None for r in records)
        notes.append(f"{class_name}: {paired} of {len(records)} images have a mask")
    if patients:
        with_id = sum(r.patient_id is not None for r in records)
        notes.append(f"{class_name}: patient ids for {with_id} of {len(records)} images from {metadata.name}")
    return records, layout


def discover(data_dir: str | Path, classes: Sequence[str], positive_class: str) -> Discovery:
    """List the image files of ``classes`` under ``data_dir`` (see the module docstring for layouts).

    Files without an image extension are listed too (preprocessing rejects them with a reason);
    hidden files, OS files (Thumbs.db) and spreadsheets are skipped and counted in ``notes``.
    Folders that are not named in ``classes`` are ignored.

    Raises DatasetError when ``data_dir`` is not a folder, a class has no folder (the message lists
    the folders that exist), or a class folder holds no .png/.jpg/.jpeg file.
    """
    classes = [str(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise DatasetError(f"classes={classes}: give each class once, e.g. -P classes=COVID,Normal")
    if positive_class not in classes:
        raise DatasetError(f"positive_class={positive_class!r} is not among classes={classes}")
    root = Path(data_dir).expanduser().absolute()
    if not root.exists():
        raise DatasetError(f"data folder {root} does not exist; check -P data_dir=...")
    if not root.is_dir():
        raise DatasetError(f"data folder {root} is a file, not a folder; point -P data_dir=... at the folder")

    notes: list[str] = []
    root = _find_root(root, classes, notes)
    folders = _subdirs(root)
    matched: dict[str, str] = {}
    for class_name in classes:
        folder, ambiguous = _match_folder(class_name, folders)
        if folder is None:
            found = ", ".join(repr(f) for f in folders) or "none"
            why = f"several folders match ignoring case ({', '.join(ambiguous)})" if ambiguous else "no folder"
            raise DatasetError(
                f"class {class_name!r}: {why} in {root}. Class folders there: {found}. "
                f"Fix: name the folders you want, e.g. -P classes=\"{','.join(folders[:2]) or 'COVID,Normal'}\" "
                "(and -P positive_class=... to one of them)"
            )
        if folder in matched.values():
            raise DatasetError(f"classes {classes} name the folder {root / folder} twice; give each class once")
        if folder != class_name:
            notes.append(f"class {class_name!r} matched folder {folder!r} ignoring case")
        matched[class_name] = folder

    records: list[ImageRecord] = []
    layouts: set[str] = set()
    for class_name, folder in matched.items():
        class_records, layout = _class_records(root, folder, class_name, int(class_name == positive_class), notes)
        records.extend(class_records)
        layouts.add(layout)
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    if layout == "mixed":
        notes.append("some classes use <Class>/images/, others hold images directly; both are read")
    return Discovery(records=records, layout=layout, notes=notes)


# --------------------------------------------------------------------------------------------------
# Duplicate groups
# --------------------------------------------------------------------------------------------------


def _as_words(values: Any) -> np.ndarray:
    """Perceptual hashes as uint64 words, shape (N, W): a 256-bit hash is 4 words, a 64-bit one 1.

    Accepts a (N, W) unsigned array, a 1-D int array (int64 read as the same 64 bits) or a sequence
    of Python ints of any width (split into big-endian 64-bit words).
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.ndim == 2:
            return values.astype(np.uint64)
        words = values.astype(np.int64).view(np.uint64) if values.dtype.kind == "i" else values.astype(np.uint64)
        return words.reshape(-1, 1)
    # Not np.asarray: a list holding ints >= 2**63 silently becomes float64 and loses bits.
    ints = [int(v) for v in values]
    width = max([1] + [(v.bit_length() + 63) // 64 for v in ints])
    out = np.zeros((len(ints), width), dtype=np.uint64)
    for i, v in enumerate(ints):
        for w in range(width):
            out[i, width - 1 - w] = (v >> (64 * w)) & _UINT64_MASK
    return out


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected-component label per node of an undirected graph with edges u[k]-v[k]."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _first_appearance_ids(labels: np.ndarray) -> np.ndarray:
    """Relabel so ids are 0..G-1 in the order each group first appears."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def duplicate_groups(sha256: Sequence[str], phash: Any, max_distance: int) -> np.ndarray:
    """Group id per image: int64[N], ids 0..G-1 in order of first appearance.

    Two images share a group when their sha256 strings are equal or their perceptual hashes (64 or
    256 bits) differ in at most ``max_distance`` bits; groups are transitive (a~b and b~c puts a, b, c together,
    even if a and c are far apart). ``max_distance < 0`` switches the perceptual test off.
    ``phash``: uint64 (N, W) words, uint64[N]/int64[N] (one word) or a sequence of Python ints.

    Cost: all pairs of distinct hashes, as blocked matrix products (about 1.7 s for N=21,000).
    """
    n = len(sha256)
    hashes = _as_words(phash)
    if len(hashes) != n:
        raise ValueError(f"sha256 has {n} entries but phash has {len(hashes)}; give one of each per image")
    rows = np.arange(n, dtype=np.int64)
    sha_strings = np.asarray(sha256, dtype=object).astype(str)
    _, sha_first, sha_inverse = np.unique(sha_strings, return_index=True, return_inverse=True)
    u, v = [rows], [sha_first[sha_inverse.reshape(-1)]]
    if max_distance >= 0 and n:
        unique_hashes, hash_first, hash_inverse = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
        u.append(rows)
        v.append(hash_first[hash_inverse.reshape(-1)])
        m = len(unique_hashes)
        # Hamming distance as a matrix product: with bits as +-1, a.b = n_bits - 2 * hamming(a, b).
        # One BLAS call per block instead of a popcount over an (rows, m, words) array: ~30x faster.
        signs = 1.0 - 2.0 * np.unpackbits(unique_hashes.view(np.uint8), axis=1).astype(np.float32)
        n_bits = signs.shape[1]
        block = max(1, 16_000_000 // m)
        for start in range(0, m, block):
            stop = min(m, start + block)
            # Upper triangle only: each unordered pair of distinct hashes once. Exact: integers <= 256.
            distance = (n_bits - signs[start:stop] @ signs[start:].T) / 2
            close = distance <= max_distance
            close[:, : stop - start] &= np.triu(np.ones((stop - start, stop - start), dtype=bool), k=1)
            a, b = np.nonzero(close)
            if len(a):
                u.append(hash_first[start + a])
                v.append(hash_first[start + b])
    labels = _components(n, np.concatenate(u), np.concatenate(v))
    return _first_appearance_ids(labels)


def count_duplicate_groups(groups: Sequence[int] | np.ndarray) -> int:
    """Number of groups with more than one member."""
    groups = np.asarray(groups, dtype=np.int64)
    if groups.size == 0:
        return 0
    _, counts = np.unique(groups, return_counts=True)
    return int((counts > 1).sum())


def _is_missing(value: Any) -> bool:
    return _clean_id(value) is None


def merge_groups(*keys: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Union of several groupings of the same N rows: int64[N], ids in order of first appearance.

    Two rows share the result's group when they share any key's value. None, NaN and "" mean "no
    key" (an image without a patient id joins nobody through that key). Values of different keys
    never match each other (patient "3" is not duplicate group 3).
    """
    if not keys:
        raise ValueError("merge_groups needs at least one grouping")
    n = len(keys[0])
    if any(len(k) != n for k in keys):
        raise ValueError(f"groupings differ in length: {[len(k) for k in keys]}; give one value per row each")
    u: list[int] = []
    v: list[int] = []
    for key in keys:
        first_row: dict[Any, int] = {}
        for row, value in enumerate(np.asarray(key, dtype=object).tolist()):
            if _is_missing(value):
                continue
            anchor = first_row.setdefault(value, row)
            if anchor != row:
                u.append(anchor)
                v.append(row)
    labels = _components(n, np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64))
    return _first_appearance_ids(labels)


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def stratified_group_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    val_frac: float,
    test_frac: float,
    seed: int,
) -> np.ndarray:
    """Assign each row to "train", "val" or "test"; returns a str array [N].

    Whole groups move together (no group straddles two splits). Groups are shuffled with ``seed``,
    then stably sorted by size, largest first, and each is placed greedily in the split that is least
    filled relative to its per-class target, counting the group at half its size (Webster/Sainte-Laguë
    apportionment: unbiased rounding, so split sizes land within about one group of
    ``frac * class count`` for every class, which is what keeps the positive rate of each split close
    to the overall one). Ties go to train, then val, then test.

    Small classes: a class with fewer than about ``1 / (2 * frac)`` images gets none in that split (with
    val_frac = test_frac = 0.1: 1-4 images all go to train, the 5th goes to val). Metrics of such a
    split are undefined for that class; callers should check. Fewer rows than splits likewise fill
    train first. ``labels`` may hold any values; each distinct value is stratified.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be 1-D and the same length")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    n = len(labels)
    if n == 0:
        return np.array([], dtype="<U5")
    _, class_of_row = np.unique(labels, return_inverse=True)
    group_ids, group_of_row = np.unique(groups, return_inverse=True)
    class_of_row, group_of_row = class_of_row.reshape(-1), group_of_row.reshape(-1)
    n_classes, n_groups = int(class_of_row.max()) + 1, len(group_ids)
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_of_row, class_of_row), 1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]

    fracs = (1.0 - val_frac - test_frac, val_frac, test_frac)
    targets = [[f * total for total in counts.sum(axis=0).tolist()] for f in fracs]
    filled = [[0.0] * n_classes for _ in SPLITS]
    split_of_group = np.zeros(n_groups, dtype=np.int64)
    # A Python loop over groups: 3 splits x 2 classes of float arithmetic is cheaper per group than
    # numpy call overhead (21,000 groups take ~0.1 s).
    for g in order.tolist():
        present = [(c, k) for c, k in enumerate(counts[g].tolist()) if k]
        size = sum(k for _, k in present)
        best, best_score = 0, math.inf
        for s in range(len(SPLITS)):
            if any(targets[s][c] <= 0 for c, _ in present):
                continue  # a zero-fraction split takes nothing
            score = sum(k * (filled[s][c] + k / 2) / targets[s][c] for c, k in present) / size
            if score < best_score:
                best, best_score = s, score
        split_of_group[g] = best
        for c, k in present:
            filled[best][c] += k
    return np.asarray(SPLITS)[split_of_group[group_of_row]]


__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetError",
    "ImageRecord",
    "Discovery",
    "discover",
    "duplicate_groups",
    "count_duplicate_groups",
    "merge_groups",
    "stratified_group_split",
]
