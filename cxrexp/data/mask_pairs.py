"""Find (image, lung mask) pairs for training and checking the lung segmenter (pure: lists folders only).

Layouts, per folder of ``mask_dirs``:

- ``kaggle``: ``<dir>/<Class>/images/<name>`` with ``<dir>/<Class>/masks/<name>`` (the COVID-19
  Radiography Database, whose masks are 256 px beside 299 px images), also one folder down;
- ``pair``: ``<dir>/images/<name>`` with ``<dir>/masks/<name>`` (e.g. the NLM Montgomery/Shenzhen sets).

A pair's ``source`` is its hospital where the file name tells (``MCUCXR_*`` Montgomery, ``CHNCXR_*``
Shenzhen), else its class folder (kaggle) or its folder's base name (pair). An image without a mask,
or a mask without an image, is listed with the reason, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cxrexp.data.discovery import IMAGE_EXTENSIONS, excluded_by, list_files
from cxrexp.errors import DatasetError

# File-name prefixes that name a hospital (the NLM sets): more telling than the folder they sit in.
HOSPITAL_PREFIXES = {"MCUCXR_": "montgomery", "CHNCXR_": "shenzhen"}


@dataclass(frozen=True)
class MaskPair:
    """One image with its lung mask; paths absolute, ``source`` as described in the module docstring."""

    image: str
    mask: str
    source: str


@dataclass(frozen=True)
class MaskPairs:
    """``pairs`` in folder, then natural file order; ``unpaired``: (path, reason); ``layouts``: per folder."""

    pairs: list[MaskPair]
    unpaired: list[tuple[str, str]]
    layouts: dict[str, str]


def source_of(name: str, folder_source: str) -> str:
    for prefix, hospital in HOSPITAL_PREFIXES.items():
        if name.startswith(prefix):
            return hospital
    return folder_source


def _images_in(folder: Path) -> dict[str, str]:
    """{file name: path} of the image files directly in ``folder``, in discovery's natural order (hidden
    files, OS droppings and spreadsheets ignored, as ``discovery.list_files`` does for the classifier)."""
    names = list_files(folder).names
    return {name: str(folder / name) for name in names if name.lower().endswith(IMAGE_EXTENSIONS)}


def _pair_folder(images_dir: Path, masks_dir: Path, folder_source: str, exclude: tuple[str, ...],
                 pairs: list[MaskPair], unpaired: list[tuple[str, str]]) -> None:
    images = _images_in(images_dir)
    masks = _images_in(masks_dir) if masks_dir.is_dir() else {}
    for name in images:  # natural order
        if excluded_by(name, exclude):
            continue
        if name not in masks:
            unpaired.append((images[name], f"no mask {masks_dir / name}"))
            continue
        pairs.append(MaskPair(str(Path(images[name]).absolute()), str(Path(masks[name]).absolute()),
                              source_of(name, folder_source)))
    for name in sorted(set(masks) - set(images)):
        if not excluded_by(name, exclude):
            unpaired.append((masks[name], f"no image {images_dir / name}"))


def _is_pair_layout(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _kaggle_classes(root: Path) -> list[Path]:
    """The ``<Class>`` folders holding ``images/`` in ``root``, else in the first of its sub-folders that has
    any (the kaggle layout, also one folder down); empty when there are none."""
    for base in [root] + [p for p in sorted(root.iterdir()) if p.is_dir()]:
        classes = [p for p in sorted(base.iterdir()) if p.is_dir() and (p / "images").is_dir()]
        if classes:
            return classes
    return []


def has_masks(folder: str) -> bool:
    """Whether ``folder`` holds lung masks that ``find_mask_pairs`` would pair (folder checks only, no file
    listing): what ``main`` asks before training a segmenter on a dataset's own masks."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return False
    return _is_pair_layout(root) or any((c / "masks").is_dir() for c in _kaggle_classes(root))


def find_mask_pairs(mask_dirs: tuple[str, ...] | list[str], exclude: tuple[str, ...] = ()) -> MaskPairs:
    """Every (image, mask) pair under ``mask_dirs``; ``exclude``: file-name globs left out (e.g. ``*_0.png``,
    images kept for external validation). ``DatasetError`` for a folder in neither layout."""
    pairs: list[MaskPair] = []
    unpaired: list[tuple[str, str]] = []
    layouts: dict[str, str] = {}
    for text in mask_dirs:
        root = Path(text).expanduser()
        if not root.is_dir():
            raise DatasetError(f"mask_dirs: {root} is not a folder")
        if _is_pair_layout(root):
            layouts[str(root)] = "pair"
            _pair_folder(root / "images", root / "masks", root.name, exclude, pairs, unpaired)
            continue
        classes = _kaggle_classes(root)
        if classes:
            layouts[str(root)] = "kaggle"
            with_masks = [p for p in classes if (p / "masks").is_dir()]
            for class_dir in classes:
                if class_dir not in with_masks:
                    unpaired.append((str(class_dir / "images"), f"no masks/ folder beside it in {class_dir}"))
            for class_dir in with_masks:
                _pair_folder(class_dir / "images", class_dir / "masks", class_dir.name, exclude, pairs, unpaired)
        else:
            raise DatasetError(
                f"mask_dirs: {root} has neither images/ + masks/ nor <Class>/images + <Class>/masks folders "
                f"(it holds: {sorted(p.name for p in root.iterdir())[:20]})"
            )
    return MaskPairs(pairs, unpaired, layouts)


__all__ = ["HOSPITAL_PREFIXES", "MaskPair", "MaskPairs", "find_mask_pairs", "has_masks", "source_of"]
