"""The synthetic chest X-ray set: determinism, labels, masks, lesions and the shortcut marker."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from cxrexp.config import REAL_PREVALENCE
from cxrexp.images.synthetic import (
    BORDER_FRACTION,
    SyntheticImage,
    SyntheticSpec,
    _render_chest,
    border_band,
    generate,
    labels_for,
    make_image,
)

SMALL = SyntheticSpec(count=40, size=48, seed=3)


@pytest.fixture(scope="module")
def small_set() -> list[SyntheticImage]:
    return list(generate(SMALL))


def test_same_seed_and_index_give_identical_images():
    first = make_image(SMALL, 7)
    again = make_image(SMALL, 7)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.mask.tobytes() == again.mask.tobytes()
    assert (first.label, first.has_marker) == (again.label, again.has_marker)


def test_order_does_not_matter(small_set):
    # Workers make images in any order: index 12 made alone equals index 12 made in sequence.
    assert make_image(SMALL, 12).image.tobytes() == small_set[12].image.tobytes()


@pytest.mark.parametrize("change", [{"seed": 4}, {"size": 64}])
def test_other_seed_or_size_gives_other_images(change):
    other = replace(SMALL, **change)
    assert make_image(SMALL, 5).image.tobytes() != make_image(other, 5).image.tobytes()


def test_neighbouring_indices_differ(small_set):
    assert small_set[0].image.tobytes() != small_set[1].image.tobytes()


@pytest.mark.parametrize(
    "count, prevalence, positives",
    [
        (1200, REAL_PREVALENCE, 314),  # 1200 * 0.2619 = 314.25
        (40, 0.25, 10),
        (7, 0.0, 0),
        (7, 1.0, 7),
        (3, 0.4, 1),  # 1.2
        (3, 0.6, 2),  # 1.8
    ],
)
def test_label_count_is_exact(count, prevalence, positives):
    labels = labels_for(SyntheticSpec(count=count, prevalence=prevalence))
    assert labels.dtype == np.int64 and labels.shape == (count,)
    assert set(np.unique(labels)) <= {0, 1}
    assert int(labels.sum()) == positives


def test_labels_are_seeded_and_match_images(small_set):
    labels = labels_for(SMALL)
    np.testing.assert_array_equal(labels, labels_for(SMALL))
    other = labels_for(replace(SMALL, seed=SMALL.seed + 1))
    assert other.sum() == labels.sum() and not np.array_equal(other, labels)
    assert [image.label for image in small_set] == labels.tolist()
    labels[0] = 1 - labels[0]  # the caller's copy, not the cached one
    assert labels_for(SMALL)[0] != labels[0]


def test_generate_yields_every_index_once(small_set):
    assert [image.index for image in small_set] == list(range(SMALL.count))


def test_images_and_masks_have_the_documented_types(small_set):
    for item in small_set:
        assert item.image.shape == (48, 48) and item.image.dtype == np.uint8
        assert item.mask.shape == (48, 48) and item.mask.dtype == np.uint8
        assert set(np.unique(item.mask)) == {0, 1}, f"index {item.index}: mask not binary or empty"
        # Two lung fields covering a plausible share of the frame.
        assert 0.12 < item.mask.mean() < 0.5, f"index {item.index}: lung area {item.mask.mean():.2f}"


def test_lungs_are_darker_than_the_rest_of_the_body(small_set):
    for item in small_set:
        lung = item.image[item.mask == 1].mean()
        centre_column = item.image[:, 20:28][item.mask[:, 20:28] == 0].mean()  # mediastinum
        assert lung + 15 < centre_column, f"index {item.index}: lungs {lung:.0f} vs mediastinum {centre_column:.0f}"


def test_two_separate_lung_fields(small_set):
    import cv2

    for item in small_set[:10]:
        count, _ = cv2.connectedComponents(item.mask)
        assert count - 1 == 2, f"index {item.index}: {count - 1} lung components"


@pytest.mark.parametrize("seed, faintest", [(0, 0.04), (1, 0.16), (2, 0.0), (3, 0.16)])
def test_lesions_add_density_inside_the_lungs_only(seed, faintest):
    positive, mask = _render_chest(np.random.default_rng(seed), 64, positive=True, faintest=faintest)
    negative, same_mask = _render_chest(np.random.default_rng(seed), 64, positive=False, faintest=faintest)
    np.testing.assert_array_equal(mask, same_mask)
    lesion = positive - negative
    assert lesion.min() >= -1e-6, "lesions only add density"
    assert lesion.sum() > 0, "a positive must carry some lesion"
    # Blur lets a little spill over the lung edge; almost all of it is inside.
    assert (lesion * mask).sum() / lesion.sum() > 0.8


@pytest.mark.parametrize(
    "field, value",
    [("count", 0), ("prevalence", 1.5), ("prevalence", -0.1), ("size", 16), ("shortcut", 1.2), ("shortcut", -0.5),
     ("faintest", -0.1), ("faintest", 1.5)],
)
def test_spec_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**{field: value})


@pytest.mark.parametrize("index", [-1, 40])
def test_index_outside_the_set_is_refused(index):
    with pytest.raises(IndexError, match="outside"):
        make_image(SMALL, index)


# ---------------------------------------------------------------------------------------------
# The shortcut marker
# ---------------------------------------------------------------------------------------------

MARKER_BASE = SyntheticSpec(count=100, size=32, seed=11, prevalence=0.5)


@pytest.fixture(scope="module")
def marker_sets() -> dict[float, list[SyntheticImage]]:
    return {shortcut: list(generate(replace(MARKER_BASE, shortcut=shortcut))) for shortcut in (0.0, 0.5, 1.0)}


@pytest.mark.parametrize(
    "shortcut, marked_positive_rate, marked_negative_rate",
    [(0.0, (0.0, 0.0), (0.0, 0.0)), (1.0, (1.0, 1.0), (0.0, 0.0)), (0.5, (0.3, 0.7), (0.3, 0.7))],
)
def test_marker_rate(marker_sets, shortcut, marked_positive_rate, marked_negative_rate):
    images = marker_sets[shortcut]
    marked = np.array([image.has_marker for image in images])
    labels = np.array([image.label for image in images])
    positive_rate = marked[labels == 1].mean()
    negative_rate = marked[labels == 0].mean()
    assert marked_positive_rate[0] <= positive_rate <= marked_positive_rate[1]
    assert marked_negative_rate[0] <= negative_rate <= marked_negative_rate[1]


@pytest.mark.parametrize("shortcut", [0.5, 1.0])
def test_marker_is_the_only_difference_and_sits_in_the_border_clear_of_the_lungs(marker_sets, shortcut):
    # The anatomy of an index does not depend on the shortcut, so the pixels that differ from the
    # marker-free twin are exactly the marker.
    band = border_band(MARKER_BASE.size)
    for marked, plain in zip(marker_sets[shortcut], marker_sets[0.0]):
        changed = marked.image != plain.image
        assert changed.any() == marked.has_marker, f"index {marked.index}"
        assert not (changed & ~band).any(), f"index {marked.index}: marker outside the border band"
        assert not (changed & (marked.mask == 1)).any(), f"index {marked.index}: marker over the lungs"
        if marked.has_marker:
            assert marked.image[changed].max() >= 200, f"index {marked.index}: marker not bright"


@pytest.mark.parametrize("size, count", [(64, 12), (256, 5)])
def test_marker_clear_of_lungs_at_larger_sizes(size, count):
    spec = SyntheticSpec(count=count, size=size, seed=5, prevalence=1.0, shortcut=1.0)
    plain_spec = replace(spec, shortcut=0.0)
    band = border_band(size)
    for index in range(spec.count):
        marked, plain = make_image(spec, index), make_image(plain_spec, index)
        changed = marked.image != plain.image
        assert marked.has_marker and changed.sum() >= 4
        assert not (changed & ~band).any() and not (changed & (marked.mask == 1)).any()


@pytest.mark.parametrize("size, width", [(100, 12), (256, 30), (32, 3)])
def test_border_band_width(size, width):
    band = border_band(size)
    assert int(BORDER_FRACTION * size) == width
    assert band[width - 1, size // 2] and not band[width, size // 2]
    assert band[size // 2, size - width] and not band[size // 2, size - width - 1]


def test_the_faintest_lesion_sets_the_difficulty():
    """A larger ``faintest`` only strengthens the lesions of the same positives (same anatomy)."""
    faint, strong = (make_image(SyntheticSpec(count=8, size=64, prevalence=1.0, faintest=f), 3) for f in (0.04, 0.16))
    plain = make_image(SyntheticSpec(count=8, size=64, prevalence=0.0), 3)
    extra_faint = faint.image.astype(int) - plain.image.astype(int)
    extra_strong = strong.image.astype(int) - plain.image.astype(int)
    np.testing.assert_array_equal(faint.mask, strong.mask)
    assert extra_strong.sum() > extra_faint.sum() > 0
