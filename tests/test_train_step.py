"""`train` without data prepares the built-in set exactly as `main` does, so the two share one segment run."""

from __future__ import annotations

import pytest

from cxrexp.config import MainConfig, TrainConfig
from cxrexp.steps import train_step


@pytest.mark.parametrize("preset, segments", [("default", True), ("seed", False)])
def test_train_without_data_uses_mains_segmenter_settings(monkeypatch, preset, segments):
    seen = {}

    def fake_segment(cfg):
        seen["segment"] = cfg
        return "models:/cxr-lung-seg-synthetic/1"

    monkeypatch.setattr(train_step.segmenter_run, "ensure", fake_segment)
    monkeypatch.setattr(train_step.preprocess_run, "ensure", lambda cfg: cfg)
    prepared = train_step.resolve_data(TrainConfig(preset=preset))
    main = MainConfig()
    if segments:
        assert (seen["segment"].image_size, seen["segment"].epochs) == (main.seg_image_size, main.seg_epochs)
        assert seen["segment"].mask_dirs == ()  # the built-in set's own masks
        assert prepared.image.lung_model == "models:/cxr-lung-seg-synthetic/1"
    else:  # the published recipe: whole 299 px images, no segmenter
        assert "segment" not in seen
        assert prepared.image.lungs == "none"
