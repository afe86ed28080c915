"""Which segmenter cuts main's lung views (cxrexp.lungs.segmenter_choice) and where a dataset ships masks."""

from __future__ import annotations

import pytest

from cxrexp.errors import SegmenterUnavailable
from cxrexp.lungs.segmenter_choice import choose_segmenter

CHAMPION = "models:/cxr-lung-seg/3"

CASES = {
    # name: (data_dir, mask_dirs, champion, data_has_masks) -> (train, mask_dirs, model_uri, words in the reason)
    "mask_dirs win over everything": (("/db", ("/masks",), CHAMPION, True), (True, ("/masks",), "", "-P mask_dirs")),
    "the built-in set trains on its own masks": (("", (), CHAMPION, False), (True, (), "", "synthetic")),
    "the champion before the data's masks": (("/db", (), CHAMPION, True), (False, (), CHAMPION, "champion")),
    "the data's own masks without a champion": (("/db", (), None, True), (True, ("/db",), "", "ships")),
}


@pytest.mark.parametrize("given, expected", CASES.values(), ids=CASES.keys())
def test_choose_segmenter(given, expected):
    data_dir, mask_dirs, champion, has_masks = given
    choice = choose_segmenter(data_dir=data_dir, mask_dirs=mask_dirs, champion_uri=champion, data_has_masks=has_masks)
    train, wanted_dirs, uri, words = expected
    assert (choice.train, choice.mask_dirs, choice.model_uri) == (train, wanted_dirs, uri)
    assert words in choice.reason


def test_real_films_with_nothing_to_cut_them_are_refused_with_every_way_out():
    with pytest.raises(SegmenterUnavailable) as refused:
        choose_segmenter(data_dir="/data/mini", mask_dirs=(), champion_uri=None, data_has_masks=False)
    message = str(refused.value)
    assert "/data/mini" in message
    for way_out in ("-P mask_dirs=", "-e segment", "-P lungs=none"):
        assert way_out in message


@pytest.mark.parametrize("layout, expected", [
    ({"COVID/images/a.png": "", "COVID/masks/a.png": ""}, True),  # Kaggle
    ({"db/COVID/images/a.png": "", "db/COVID/masks/a.png": ""}, True),  # Kaggle, one folder down
    ({"images/a.png": "", "masks/a.png": ""}, True),  # pair layout
    ({"COVID/images/a.png": "", "Normal/images/b.png": ""}, False),  # cxr-mini: no masks
    ({"COVID/a.png": ""}, False),  # plain class folders
])
def test_has_masks(tmp_path, layout, expected):
    from cxrexp.data.mask_pairs import has_masks

    for name, text in layout.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert has_masks(str(tmp_path)) is expected
    assert has_masks(str(tmp_path / "missing")) is False


def test_a_segment_run_is_named_by_what_it_learnt_from():
    from cxrexp.config import SegmentConfig

    assert SegmentConfig().model_name == "cxr-lung-seg-synthetic"
    assert SegmentConfig(mask_dirs=("/db",)).model_name == "cxr-lung-seg"
    assert SegmentConfig(registered_model_name="mine").model_name == "mine"
