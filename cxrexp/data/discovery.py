"""Find the images of a dataset tree: classes, masks, patient ids.

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

import errno
import fnmatch
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cxrexp.errors import DatasetError
from cxrexp.images.decode import file_kind

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Spreadsheets sit beside or inside class folders (the Kaggle metadata); OS droppings are not data.
_SPREADSHEET_EXTENSIONS = (".xlsx", ".xls", ".csv")
_OS_FILES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
_FILE_NAME_COLUMNS = ("filename", "file", "imagename", "imagefile", "image", "imageid")
_PATIENT_COLUMNS = ("patientid", "patient")  # normalised: lower case, letters and digits only


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
    ``"kaggle"``, ``"plain"`` or ``"mixed"``; ``notes`` are human sentences worth logging;
    ``unusable`` (path, reason) lists entries of the image and mask folders that cannot be images
    (FIFOs, broken symlinks, symlink loops), to be reported as skipped; ``excluded`` (path, reason)
    the files the user's ``exclude`` patterns left out."""

    records: list[ImageRecord]
    layout: str
    notes: list[str]
    unusable: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, "excluded by ...") on request


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def _natural_key(name: str) -> tuple:
    # "COVID-2" before "COVID-10"; re.split keeps text at even and digits at odd positions, so the
    # tuples always compare str with str and int with int. The raw name breaks remaining ties.
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)) + (name,)


def _scandir(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; DatasetError naming it when it cannot be listed (permissions, a
    folder that vanished), since a class or mask folder that cannot be read leaves nothing to do."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError as err:
        raise DatasetError(f"cannot list {folder}: {err.strerror or err}; fix its permissions or leave it out") from None


def _subdirs(folder: Path) -> list[str]:
    return sorted(e.name for e in _scandir(folder) if not e.name.startswith(".") and _is_dir(e))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP) or an unreadable link: not a folder, listed as unusable
        return False


def _is_ignored_file(name: str) -> bool:
    lower = name.lower()
    return name.startswith(".") or lower in _OS_FILES or lower.endswith(_SPREADSHEET_EXTENSIONS)


def _unusable_reason(entry: os.DirEntry) -> str | None:
    """Why an entry that is neither a folder nor a regular file cannot be an image, or None if it is a
    regular file. Decided from its type alone: a FIFO is never opened (a read would wait forever)."""
    try:
        if entry.is_file():
            return None
        info = entry.stat()  # follows links: a broken link or a loop raises
    except FileNotFoundError:
        return "broken symlink (its target does not exist)" if entry.is_symlink() else "vanished while listing"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        return f"cannot read: {err.strerror or err}"
    return f"not a regular file: {file_kind(info.st_mode)}"


def display_name(text: str) -> str:
    """``text`` as it can be written to a CSV, a log or MLflow: a file name that is not valid UTF-8
    (Python keeps its bytes as lone surrogates) gets its bad bytes as ``\\xNN`` escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Listing:
    """One folder's entries: data file names in natural order; counts of ignored non-data files and
    sub-folders; ``unusable`` (path, reason) for entries that cannot be images (a FIFO, a broken
    symlink, a symlink loop), which the pipeline reports in ``skipped.csv``."""

    names: list[str]
    ignored: int
    subfolders: int
    unusable: list[tuple[str, str]]


def list_files(folder: Path) -> Listing:
    """The entries of ``folder`` (see ``Listing``); DatasetError when it cannot be listed."""
    names: list[str] = []
    unusable: list[tuple[str, str]] = []
    ignored = subfolders = 0
    for entry in _scandir(folder):
        if _is_dir(entry):
            subfolders += not entry.name.startswith(".")
        elif _is_ignored_file(entry.name):
            ignored += 1
        else:
            reason = _unusable_reason(entry)
            if reason is None:
                names.append(entry.name)
            else:
                unusable.append((str(folder / entry.name), reason))
    return Listing(sorted(names, key=_natural_key), ignored, subfolders, sorted(unusable))


# The COVID-19 Radiography Database's paediatric normals, Normal-63 .. Normal-1403 (1,341 films from a
# children's hospital; the rest of Normal is adult): what `-P exclude` needs to leave them out.
PAEDIATRIC_NORMALS = ("Normal-6[3-9].png", "Normal-[7-9][0-9].png", "Normal-[1-9][0-9][0-9].png",
                      "Normal-1[0-3][0-9][0-9].png", "Normal-140[0-3].png")


# Names for pattern sets, usable inside -P exclude: `-P exclude=@paediatric-normals`.
EXCLUDE_SETS = {"@paediatric-normals": PAEDIATRIC_NORMALS}


def expand_exclude(patterns: Sequence[str]) -> tuple[str, ...]:
    """``patterns`` with each named set (``EXCLUDE_SETS``) replaced by its globs; an unknown ``@name``
    is an error that lists the known ones (a typo must not silently exclude nothing)."""
    out: list[str] = []
    for pattern in patterns:
        if pattern.startswith("@"):
            if pattern not in EXCLUDE_SETS:
                raise DatasetError(f"-P exclude: {pattern!r} is not a known set; known: {', '.join(EXCLUDE_SETS)}")
            out.extend(EXCLUDE_SETS[pattern])
        else:
            out.append(pattern)
    return tuple(out)


def excluded_by(name: str, patterns: Sequence[str]) -> str | None:
    """The first of ``patterns`` (shell globs, case-sensitive: ``Normal-1[0-3][0-9][0-9].png``) that the
    file name ``name`` matches, else None. The one rule for ``exclude`` in preprocess and segment."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


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


def clean_id(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return None
    text = str(value).strip()
    return text or None


def _find_metadata(root: Path, folder: str, class_name: str) -> Path | None:
    wanted = [f"{stem}.metadata{ext}".lower() for ext in (".xlsx", ".csv") for stem in (folder, class_name)]
    present = {e.name.lower(): e.name for e in _scandir(root) if e.is_file()}
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
        file_name, patient_id = clean_id(file_value), clean_id(patient)
        if file_name is not None and patient_id is not None:
            mapping.setdefault(_file_key(file_name), patient_id)  # first row wins on repeats
    return mapping


def _class_records(
    root: Path, folder: str, class_name: str, label: int, notes: list[str], unusable: list[tuple[str, str]],
    exclude: Sequence[str], excluded: list[tuple[str, str]],
) -> tuple[list[ImageRecord], str]:
    """(the records of one class folder, its layout ``kaggle`` or ``plain``); notes, unusable entries
    and the files ``exclude`` leaves out are appended.

    Long: one pass over the folder decides layout, masks and patient ids together, because each depends
    on what the folder holds.
    """
    class_dir = root / folder
    inner = _subdirs(class_dir)
    images_dir, _ = _match_folder("images", inner)
    if images_dir is not None:
        layout, image_dir = "kaggle", class_dir / images_dir
        loose = list_files(class_dir).names
        if loose:
            notes.append(f"{class_name}: {len(loose)} files directly in {class_dir} ignored (images/ is used)")
    else:
        layout, image_dir = "plain", class_dir
    listing = list_files(image_dir)
    names, ignored, subfolders = listing.names, listing.ignored, listing.subfolders
    unusable.extend(listing.unusable)
    if ignored:
        notes.append(f"{class_name}: {ignored} hidden, OS or spreadsheet files in {image_dir} ignored")
    if subfolders:
        notes.append(f"{class_name}: {subfolders} sub-folders of {image_dir} ignored (not searched recursively)")
    if listing.unusable:
        notes.append(f"{class_name}: {len(listing.unusable)} entries of {image_dir} are not readable files "
                     "(FIFOs, broken symlinks, symlink loops): listed in skipped.csv")
    bad_names = [n for n in names if display_name(n) != n]
    if bad_names:
        notes.append(f"{class_name}: {len(bad_names)} file names are not valid UTF-8 (e.g. {display_name(bad_names[0])}): "
                     "kept, and written with \\x escapes in manifest.csv, skipped.csv and the logs")

    if exclude:
        kept = []
        for name in names:
            pattern = excluded_by(name, exclude)
            if pattern is None:
                kept.append(name)
            else:
                excluded.append((str(image_dir / name), f"excluded by -P exclude pattern {pattern!r}"))
        if len(kept) < len(names):
            notes.append(f"{class_name}: {len(names) - len(kept)} files excluded by -P exclude (listed in skipped.csv)")
        if names and not kept:
            raise DatasetError(f"class {class_name!r}: -P exclude={','.join(exclude)} leaves none of the "
                               f"{len(names)} files in {image_dir}; narrow the patterns")
        names = kept
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
        mask_listing = list_files(class_dir / masks_dir)
        mask_names = mask_listing.names
        unusable.extend(mask_listing.unusable)
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


def discover(data_dir: str | Path, classes: Sequence[str], positive_class: str,
             exclude: Sequence[str] = ()) -> Discovery:
    """List the image files of ``classes`` under ``data_dir`` (see the module docstring for layouts).

    ``exclude``: file-name globs (``excluded_by``) whose files are left out and listed in
    ``Discovery.excluded``, e.g. a source known to teach a shortcut (docs/lungs.md).

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

    exclude = expand_exclude(exclude)
    records: list[ImageRecord] = []
    unusable: list[tuple[str, str]] = []
    excluded: list[tuple[str, str]] = []
    layouts: set[str] = set()
    for class_name, folder in matched.items():
        class_records, layout = _class_records(root, folder, class_name, int(class_name == positive_class), notes,
                                               unusable, exclude, excluded)
        records.extend(class_records)
        layouts.add(layout)
    layout = layouts.pop() if len(layouts) == 1 else "mixed"
    if layout == "mixed":
        notes.append("some classes use <Class>/images/, others hold images directly; both are read")
    return Discovery(records=records, layout=layout, notes=notes, unusable=unusable, excluded=excluded)


__all__ = ["IMAGE_EXTENSIONS", "DatasetError", "Discovery", "ImageRecord", "Listing", "clean_id", "discover",
           "display_name", "excluded_by", "expand_exclude", "list_files", "EXCLUDE_SETS", "PAEDIATRIC_NORMALS"]
