"""Run names say what ran (cxrexp.mlflow_edge.run_names): pure, table-driven."""

from __future__ import annotations

import pytest

from cxrexp.config import (
    ImageSpec,
    PreprocessConfig,
    PromoteConfig,
    SegmentConfig,
    TrainConfig,
)
from cxrexp.mlflow_edge import run_names


@pytest.mark.parametrize(
    "cfg, expected",
    [
        (PreprocessConfig(), "preprocess synthetic 128px clahe lungs=crop"),
        (PreprocessConfig(data_dir="/data/cxr-mini/", image=ImageSpec(lungs="none")),
         "preprocess cxr-mini 128px clahe lungs=none"),
        (PreprocessConfig(data_dir="/data/db", image=ImageSpec(image_size=64, lungs="crop",
                                                               lung_model="models:/cxr-lung-seg/3")),
         "preprocess db 64px clahe lungs=crop"),
    ],
)
def test_preprocess_name(cfg, expected):
    assert run_names.preprocess_name(cfg) == expected


@pytest.mark.parametrize(
    "cfg, size, expected",
    [
        (TrainConfig(), 128, "train 128px default"),
        (TrainConfig(preset="seed", seed=1), 299, "train 299px seed seed=1"),
        (TrainConfig(batch_norm=True), 64, "train 64px default bn"),
    ],
)
def test_train_name(cfg, size, expected):
    assert run_names.train_name(cfg, size) == expected


def test_study_evaluate_segment_and_promote_names():
    assert run_names.study_name(TrainConfig(study_name="cnn-search"), 128) == "study cnn-search 128px"
    assert run_names.joined_study_name(TrainConfig(study_name="cnn-search"), 128) == "study cnn-search 128px (joined)"
    assert run_names.evaluate_name("cxr-covid-cnn v3", "6cf9af66c98aecd3") == "evaluate cxr-covid-cnn v3 on 6cf9af66"
    assert run_names.evaluate_name("model", "") == "evaluate model"
    assert run_names.segment_name(SegmentConfig()) == "segment synthetic 128px"
    assert run_names.segment_name(SegmentConfig(mask_dirs=("/d/cxr-masks", "/d/lung-seg-nlm"), image_size=64)) == \
        "segment cxr-masks+lung-seg-nlm 64px"
    assert run_names.segment_name(SegmentConfig(image_size=64, conv="separable")) == "segment synthetic 64px separable"
    assert run_names.promote_name(PromoteConfig()) == "promote cxr-covid-cnn"
