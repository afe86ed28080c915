"""Which segmenter cuts ``main``'s lung views: a pure decision, every reason in plain words.

``main`` with a lung view (the default, ``lungs=crop``) needs a segmenter that knows the films it will
cut. In order:

1. ``mask_dirs`` given: train one on those masks (``segment``, reused when it already ran with the
   same parameters);
2. the built-in synthetic set (no ``data_dir``): train one on its own synthetic masks, registered
   apart as ``cxr-lung-seg-synthetic`` so it never becomes the segmenter real films are cut with;
3. the registry has a ``cxr-lung-seg@champion``: use that version (trained on real masks);
4. the data folder ships lung masks (the COVID-19 Radiography Database's ``<Class>/masks``): train
   one on them;
5. otherwise there is nothing sensible to cut real films with: ``SegmenterUnavailable`` says what to
   pass. A segmenter trained on synthetic masks would crop real films wrongly, and silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrexp.config import DEFAULT_LUNG_MODEL, SYNTHETIC_SEGMENTER_NAME
from cxrexp.errors import SegmenterUnavailable


@dataclass(frozen=True)
class SegmenterChoice:
    """``train``: run ``segment`` on ``mask_dirs`` (empty: the built-in set's masks); otherwise use the
    registered ``model_uri``. ``reason``: one sentence for the log and the main run's tag."""

    train: bool
    mask_dirs: tuple[str, ...]
    model_uri: str
    reason: str


def choose_segmenter(*, data_dir: str, mask_dirs: tuple[str, ...], champion_uri: str | None,
                     data_has_masks: bool) -> SegmenterChoice:
    """The decision above. ``champion_uri``: the registry's real-mask champion as a version URI
    (``models:/cxr-lung-seg/3``), or None; ``data_has_masks``: whether ``data_dir`` holds lung masks."""
    if mask_dirs:
        return SegmenterChoice(True, tuple(mask_dirs), "", f"trained on the masks in -P mask_dirs={','.join(mask_dirs)}")
    if not data_dir:
        return SegmenterChoice(True, (), "", "the built-in set: trained on its own synthetic lung masks "
                                             f"(registered apart, as {SYNTHETIC_SEGMENTER_NAME})")
    if champion_uri:
        return SegmenterChoice(False, (), champion_uri, f"the registry's champion segmenter, {champion_uri} "
                                                        "(-P mask_dirs=... trains a new one)")
    if data_has_masks:
        return SegmenterChoice(True, (data_dir,), "", f"trained on the lung masks that {data_dir} ships")
    raise SegmenterUnavailable(
        f"lungs=crop (the default) cuts every film to its lungs with a lung segmenter, and there is none to "
        f"use: this tracking store has no {DEFAULT_LUNG_MODEL.removeprefix('models:/')} and {data_dir} has no "
        "masks/ folders. Pass "
        "-P mask_dirs=<folders with lung masks> (Kaggle <Class>/images + <Class>/masks, or images/ + masks/; "
        "e.g. the COVID-19 Radiography Database itself), train one first with `mlflow run . -e segment "
        "--env-manager local -P mask_dirs=...`, or use whole images with -P lungs=none"
    )


__all__ = ["SegmenterChoice", "choose_segmenter"]
