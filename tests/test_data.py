"""Discovery of dataset trees, duplicate groups and the grouped stratified split."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrexp.data.discovery import DatasetError, Discovery, discover
from cxrexp.data.split import (
    count_duplicate_groups,
    duplicate_groups,
    merge_groups,
    stratified_group_split,
)

CXR_MINI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cxr-mini"


def make_tree(root: Path, files: list[str]) -> Path:
    """Create ``files`` (relative paths) under ``root`` with a few placeholder bytes each."""
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not decoded here")
    return root


def rel_paths(found: Discovery, root: Path, attr: str = "path") -> list[str | None]:
    out = []
    for record in found.records:
        value = getattr(record, attr)
        out.append(None if value is None else Path(value).relative_to(root).as_posix())
    return out


def snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))} | {str(root): root.stat().st_mtime_ns}


KAGGLE_FILES = [
    "COVID/images/COVID-10.png",
    "COVID/images/COVID-2.png",
    "COVID/images/COVID-1.png",
    "COVID/masks/COVID-1.png",
    "COVID/masks/COVID-10.png",
    "Normal/images/Normal-1.png",
    "Normal/masks/Normal-1.png",
    "Viral Pneumonia/images/Viral Pneumonia-1.png",
    "Viral Pneumonia/images/.DS_Store",
    "Lung_Opacity/images/Lung_Opacity-1.png",
]


# ---------------------------------------------------------------- discovery: layouts


@pytest.mark.parametrize(
    "classes, positive, expected",
    [
        (
            ("COVID", "Normal"),
            "COVID",
            [
                ("COVID/images/COVID-1.png", "COVID", 1, "COVID/masks/COVID-1.png"),
                ("COVID/images/COVID-2.png", "COVID", 1, None),
                ("COVID/images/COVID-10.png", "COVID", 1, "COVID/masks/COVID-10.png"),
                ("Normal/images/Normal-1.png", "Normal", 0, "Normal/masks/Normal-1.png"),
            ],
        ),
        (
            ("Viral Pneumonia", "Normal"),
            "Viral Pneumonia",
            [
                ("Viral Pneumonia/images/Viral Pneumonia-1.png", "Viral Pneumonia", 1, None),
                ("Normal/images/Normal-1.png", "Normal", 0, "Normal/masks/Normal-1.png"),
            ],
        ),
        (
            ("normal", "covid"),  # case-insensitive folder match; class order as requested
            "normal",
            [
                ("Normal/images/Normal-1.png", "normal", 1, "Normal/masks/Normal-1.png"),
                ("COVID/images/COVID-1.png", "covid", 0, "COVID/masks/COVID-1.png"),
                ("COVID/images/COVID-2.png", "covid", 0, None),
                ("COVID/images/COVID-10.png", "covid", 0, "COVID/masks/COVID-10.png"),
            ],
        ),
    ],
)
def test_discover_kaggle_layout(tmp_path, classes, positive, expected):
    root = make_tree(tmp_path / "data", KAGGLE_FILES)
    found = discover(root, classes, positive)
    assert found.layout == "kaggle"
    got = list(
        zip(rel_paths(found, root), [r.class_name for r in found.records], [r.label for r in found.records],
            rel_paths(found, root, "mask_path"))
    )
    assert got == expected
    assert all(Path(r.path).is_absolute() and r.patient_id is None for r in found.records)


def test_discover_notes_masks_hidden_and_case_match(tmp_path):
    root = make_tree(tmp_path / "data", KAGGLE_FILES)
    found = discover(root, ["covid", "Viral Pneumonia"], "covid")
    text = "\n".join(found.notes)
    assert "2 of 3 images have a mask" in text
    assert "1 hidden, OS or spreadsheet files" in text  # the .DS_Store
    assert "matched folder 'COVID' ignoring case" in text


def test_discover_nested_root(tmp_path):
    root = make_tree(tmp_path / "download", [f"COVID-19_Radiography_Dataset/{f}" for f in KAGGLE_FILES])
    (tmp_path / "download" / "README.txt").write_text("licence")
    found = discover(root, ["COVID", "Normal"], "COVID")
    assert len(found.records) == 4
    assert found.records[0].path == str(root / "COVID-19_Radiography_Dataset" / "COVID" / "images" / "COVID-1.png")
    assert any("one level down" in note for note in found.notes)


def test_discover_plain_layout_mixed_case_extensions(tmp_path):
    root = make_tree(
        tmp_path / "plain",
        [
            "pos/b.PNG",
            "pos/a.jpg",
            "pos/c.JPEG",
            "pos/notes.txt",  # listed: preprocessing rejects it with a reason
            "pos/.hidden.png",
            "pos/Thumbs.db",
            "pos/labels.csv",
            "neg/x.Jpg",
            "other/y.png",
        ],
    )
    found = discover(root, ["pos", "neg"], "pos")
    assert found.layout == "plain"
    assert rel_paths(found, root) == ["pos/a.jpg", "pos/b.PNG", "pos/c.JPEG", "pos/notes.txt", "neg/x.Jpg"]
    assert [r.label for r in found.records] == [1, 1, 1, 1, 0]
    assert all(r.mask_path is None for r in found.records)
    text = "\n".join(found.notes)
    assert "3 hidden, OS or spreadsheet files" in text
    assert "1 files without a .png/.jpg/.jpeg extension" in text


def test_discover_mixed_layout(tmp_path):
    root = make_tree(tmp_path / "d", ["A/images/1.png", "B/2.png"])
    found = discover(root, ["A", "B"], "A")
    assert found.layout == "mixed"
    assert rel_paths(found, root) == ["A/images/1.png", "B/2.png"]


# ---------------------------------------------------------------- discovery: metadata


@pytest.mark.parametrize(
    "suffix, patient_column",
    [(".xlsx", "Patient ID"), (".csv", "patient_id"), (".xlsx", "PatientId"), (".csv", "patient")],
)
def test_discover_metadata_patient_ids(tmp_path, suffix, patient_column):
    root = make_tree(tmp_path / "data", KAGGLE_FILES)
    table = pd.DataFrame(
        {
            "FILE NAME": ["COVID-1", "covid-2", "COVID-10", "COVID-99"],  # case differs from the files
            "FORMAT": ["PNG"] * 4,
            "SIZE": ["256*256"] * 4,
            "URL": ["https://example.org"] * 4,
            patient_column: ["P7", "P7", None, "P9"],
        }
    )
    path = root / f"COVID.metadata{suffix}"
    table.to_excel(path, index=False) if suffix == ".xlsx" else table.to_csv(path, index=False)
    found = discover(root, ["COVID", "Normal"], "COVID")
    assert [r.patient_id for r in found.records] == ["P7", "P7", None, None]
    assert any("patient ids for 2 of 3 images" in note for note in found.notes)


def test_discover_metadata_without_patient_column_or_unreadable(tmp_path):
    root = make_tree(tmp_path / "data", KAGGLE_FILES)
    pd.DataFrame({"FILE NAME": ["COVID-1"], "FORMAT": ["PNG"], "SIZE": ["1"], "URL": ["u"]}).to_excel(
        root / "COVID.metadata.xlsx", index=False
    )
    (root / "Normal.metadata.xlsx").write_bytes(b"this is not a zip file")
    found = discover(root, ["COVID", "Normal"], "COVID")
    assert len(found.records) == 4 and all(r.patient_id is None for r in found.records)
    text = "\n".join(found.notes)
    assert "no patient id column (columns: FILE NAME, FORMAT, SIZE, URL)" in text
    assert "Normal.metadata.xlsx: metadata not read" in text


def test_discover_writes_nothing(tmp_path):
    root = make_tree(tmp_path / "data", KAGGLE_FILES)
    pd.DataFrame({"FILE NAME": ["COVID-1"], "patient id": ["P1"]}).to_excel(root / "COVID.metadata.xlsx", index=False)
    before = snapshot(root)
    time.sleep(0.01)  # a write after this point would change an mtime
    found = discover(root, ["COVID", "Normal", "Viral Pneumonia"], "COVID")
    assert found.records[0].patient_id == "P1"
    assert snapshot(root) == before


# ---------------------------------------------------------------- discovery: errors


@pytest.mark.parametrize(
    "files, data_dir, classes, positive, fragments",
    [
        ([], "missing", ["COVID", "Normal"], "COVID", ["does not exist", "missing"]),
        (["afile"], "afile", ["COVID", "Normal"], "COVID", ["is a file", "afile"]),
        (
            KAGGLE_FILES,
            "",
            ["COVID", "Pneumonia"],
            "COVID",
            ["'Pneumonia'", "'COVID', 'Lung_Opacity', 'Normal', 'Viral Pneumonia'", "-P classes="],
        ),
        (
            ["COVID/images/1.png", "Normal/images/.DS_Store", "Normal/images/readme.txt"],
            "",
            ["COVID", "Normal"],
            "COVID",
            ["'Normal'", "no .png/.jpg/.jpeg files", "Normal/images", "only 1 other files"],
        ),
        (["COVID/1.png", "Normal/2.png"], "", ["COVID", "Normal"], "Lung", ["positive_class='Lung'"]),
        (["COVID/1.png", "covid/2.png", "N/3.png"], "", ["Covid", "N"], "N", ["several folders match"]),
        (["a/COVID/1.png", "b/COVID/2.png"], "", ["COVID"], "COVID", ["several sub-folders", "a, b"]),
    ],
)
def test_discover_errors(tmp_path, files, data_dir, classes, positive, fragments):
    make_tree(tmp_path, files)
    with pytest.raises(DatasetError) as err:
        discover(tmp_path / data_dir, classes, positive)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_discover_cxr_mini():
    if not CXR_MINI.is_dir():
        pytest.skip(f"real subset not present at {CXR_MINI}")
    found = discover(CXR_MINI, ["COVID", "Normal"], "COVID")
    assert found.layout == "kaggle"
    labels = [r.label for r in found.records]
    assert labels.count(1) == 400 and labels.count(0) == 800
    assert all(r.mask_path is None and r.patient_id is None for r in found.records)
    assert labels == [1] * 400 + [0] * 800  # class order as requested
    numbers = [int(Path(r.path).stem.split("-")[1]) for r in found.records[:400]]
    assert numbers == sorted(numbers)  # natural order: COVID-2 before COVID-10
    assert discover(CXR_MINI, ["COVID", "Normal"], "COVID") == found  # deterministic


# ---------------------------------------------------------------- duplicate groups

FAR = [0x0000000000000000, 0x00000000FFFFFFFF, 0xFFFFFFFF00000000, 0xFFFFFFFFFFFFFFFF, 0x0F0F0F0F0F0F0F0F]


@pytest.mark.parametrize(
    "sha, phash, max_distance, expected",
    [
        (["a", "b", "a"], FAR[:3], 4, [0, 1, 0]),  # exact sha
        (["a", "b", "c"], [0b0, 0b111, FAR[3]], 3, [0, 0, 1]),  # 3 bits apart
        (["a", "b", "c"], [0b0, 0b111, FAR[3]], 2, [0, 1, 2]),  # one bit too many
        (["a", "b", "c"], [0b0, 0b11, 0b1111], 2, [0, 0, 0]),  # chain: 0-2 are 4 bits apart
        (["a", "b", "c", "d"], [FAR[1], FAR[0], 0b11, FAR[1] ^ 1], 2, [0, 1, 1, 0]),
        (["a", "b", "c"], [5, 5, 5], -1, [0, 1, 2]),  # near-dup disabled, even for equal hashes
        (["a", "b", "a"], [5, 6, 7], -1, [0, 1, 0]),  # ... exact sha still counts
        (["a", "b", "c"], [5, 5, FAR[3]], 0, [0, 0, 1]),
        (["x", "y", "z", "w"], [FAR[0], FAR[3], FAR[0] | 1, FAR[3]], 1, [0, 1, 0, 1]),
        (["s", "t", "u"], [1 << 63, (1 << 63) | 1, 0b110], 1, [0, 0, 1]),  # high bit survives as Python int
        (["s", "t"], [1 << 63, (1 << 63) | 1], 0, [0, 1]),  # no float64 rounding of big Python ints
        ([], [], 4, []),
    ],
)
def test_duplicate_groups(sha, phash, max_distance, expected):
    groups = duplicate_groups(sha, np.array(phash, dtype=np.uint64) if phash else phash, max_distance)
    assert groups.dtype == np.int64
    assert groups.tolist() == expected
    assert duplicate_groups(sha, list(phash), max_distance).tolist() == expected  # Python ints too


def test_duplicate_groups_int64_is_same_bits():
    unsigned = np.array([1 << 63, (1 << 63) | 1, 3], dtype=np.uint64)
    assert duplicate_groups(["a", "b", "c"], unsigned.view(np.int64), 1).tolist() == [0, 0, 1]


def test_duplicate_groups_length_mismatch():
    with pytest.raises(ValueError, match="sha256 has 2 entries but phash has 1"):
        duplicate_groups(["a", "b"], [1], 2)


@pytest.mark.parametrize("groups, expected", [([0, 1, 0, 2, 1], 2), ([0, 1, 2], 0), ([], 0), ([0, 0, 0], 1)])
def test_count_duplicate_groups(groups, expected):
    assert count_duplicate_groups(np.array(groups, dtype=np.int64)) == expected


def test_duplicate_groups_21000_finds_only_the_planted_pairs():
    rng = np.random.default_rng(0)
    n = 21_000
    hashes = rng.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True)
    hashes[100] = hashes[5] ^ np.uint64(0b101)  # a planted near-duplicate, 2 bits apart
    sha = [f"{i:064x}" for i in range(n)]
    sha[20_000] = sha[7]  # a planted exact duplicate
    groups = duplicate_groups(sha, hashes, 4)
    assert groups[100] == groups[5] and groups[20_000] == groups[7]
    # Random 64-bit hashes are ~32 bits apart; only the two planted pairs may merge.
    assert count_duplicate_groups(groups) == 2 and groups.max() == n - 3


# Cost, as counts (never seconds: speed is benchmarks/bench_duplicates.py's). Every unordered pair of
# distinct hashes must be compared (or a near-duplicate can be missed) and, up to one block's masked
# lower triangle, only once.
@pytest.mark.parametrize("m", [1, 2, 3, 999, 4_000, 21_000, 60_000])
def test_comparisons_cover_each_pair_about_once(m):
    from cxrexp.data.split import comparison_blocks, comparisons

    blocks = comparison_blocks(m)
    assert blocks[0][0] == 0 and blocks[-1][1] == m
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # contiguous, no row twice
    block_rows = max(stop - start for start, stop in blocks)
    assert m * (m - 1) // 2 <= comparisons(m) <= m * (m - 1) // 2 + block_rows * m


def test_only_distinct_hashes_are_compared(monkeypatch):
    """21,000 images with 50 distinct hashes cost a 50-hash comparison, not a 21,000 one."""
    from cxrexp.data import split

    seen = []
    real = split.comparison_blocks
    monkeypatch.setattr(split, "comparison_blocks", lambda m: seen.append(m) or real(m))
    hashes = np.repeat(np.arange(50, dtype=np.uint64) * np.uint64(0x0101010101010101), 420)
    groups = duplicate_groups([f"{i:064x}" for i in range(len(hashes))], hashes, 4)
    assert seen == [50]
    assert count_duplicate_groups(groups) == 50


# ---------------------------------------------------------------- merge_groups


@pytest.mark.parametrize(
    "keys, expected",
    [
        (([0, 1, 2, 3],), [0, 1, 2, 3]),
        (([0, 1, 2, 3], [None, "p", None, "p"]), [0, 1, 2, 1]),
        (([0, 0, 1, 2], [None, None, "p", "q"]), [0, 0, 1, 2]),
        (([0, 0, 1, 2], ["", None, "p", "q"]), [0, 0, 1, 2]),
        (([0, 1, 1, 2], ["p", None, None, "p"]), [0, 1, 1, 0]),  # chain across keys
        (([3, 2, 1, 0], [float("nan"), "x", float("nan"), "x"]), [0, 1, 2, 1]),  # NaN = no patient
        ((np.array([5, 6, 7]), ["3", "3", None]), [0, 0, 1]),
        (([1, 2], ["1", "2"]), [0, 1]),  # key values never match across keys
        (([], []), []),
    ],
)
def test_merge_groups(keys, expected):
    merged = merge_groups(*keys)
    assert merged.dtype == np.int64
    assert merged.tolist() == expected


def test_merge_groups_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        merge_groups([0, 1], [None])


# ---------------------------------------------------------------- split


def _grouped_data(n: int, prevalence: float, max_group: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and groups of sizes 1..max_group; a group's images share its label (one patient)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_group + 1, n)
    groups = np.repeat(np.arange(n), sizes)[:n]
    group_label = (rng.random(n) < prevalence).astype(np.int64)
    return group_label[groups], groups


@pytest.mark.parametrize(
    "n, prevalence, max_group",
    [(1000, 0.26, 1), (1000, 0.5, 3), (2000, 0.1, 4), (500, 0.26, 2), (21000, 0.26, 1)],
)
def test_split_invariants(n, prevalence, max_group):
    labels, groups = _grouped_data(n, prevalence, max_group, seed=n)
    split = stratified_group_split(labels, groups, 0.1, 0.15, seed=42)
    assert split.shape == (n,) and set(split.tolist()) == {"train", "val", "test"}
    assert np.array_equal(split, stratified_group_split(labels, groups, 0.1, 0.15, seed=42))
    assert not np.array_equal(split, stratified_group_split(labels, groups, 0.1, 0.15, seed=43))
    # No group straddles two splits.
    per_group = pd.DataFrame({"g": groups, "s": split}).groupby("g")["s"].nunique()
    assert per_group.max() == 1
    # Sizes within about one group per class of the request; positive rate within 0.015 of the overall.
    slack = 2 * max_group / n + 0.002
    overall = labels.mean()
    for name, frac in (("train", 0.75), ("val", 0.1), ("test", 0.15)):
        chosen = split == name
        assert abs(chosen.mean() - frac) <= slack, (name, chosen.mean())
        assert abs(labels[chosen].mean() - overall) <= 0.015, (name, labels[chosen].mean(), overall)


def test_split_big_group_goes_to_train():
    # One 300-image group (a single patient) cannot fit val's 100 target: it must not land there.
    labels = np.array([1] * 300 + [0] * 700)
    groups = np.array([0] * 300 + list(range(1, 701)))
    split = stratified_group_split(labels, groups, 0.1, 0.1, seed=0)
    assert set(split[:300].tolist()) == {"train"}


@pytest.mark.parametrize(
    "labels, expected_counts",
    [
        ([1], {"train": 1}),
        ([1, 0], {"train": 2}),
        ([1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], {"train": 10, "val": 1, "test": 1}),  # 2 positives both train
        ([1] * 5 + [0] * 50, {"train": 44, "val": 6, "test": 5}),  # 5th positive goes to val
    ],
)
def test_split_tiny_classes(labels, expected_counts):
    labels = np.array(labels)
    split = stratified_group_split(labels, np.arange(len(labels)), 0.1, 0.1, seed=1)
    counts = {name: int((split == name).sum()) for name in ("train", "val", "test")}
    assert {k: v for k, v in counts.items() if v} == expected_counts
    assert np.array_equal(split, stratified_group_split(labels, np.arange(len(labels)), 0.1, 0.1, seed=1))


def test_split_tiny_classes_positive_placement():
    labels = np.array([1] * 5 + [0] * 50)
    split = stratified_group_split(labels, np.arange(55), 0.1, 0.1, seed=1)
    assert sorted(split[:5].tolist()) == ["train"] * 4 + ["val"]


def test_split_empty_and_bad_arguments():
    assert stratified_group_split([], [], 0.1, 0.1, 0).shape == (0,)
    with pytest.raises(ValueError, match="sum below 1"):
        stratified_group_split([0, 1], [0, 1], 0.5, 0.5, 0)
    with pytest.raises(ValueError, match="same length"):
        stratified_group_split([0, 1], [0], 0.1, 0.1, 0)


def test_split_zero_fraction_split_stays_empty():
    labels = np.array([0, 1] * 50)
    split = stratified_group_split(labels, np.arange(100), 0.2, 0.0, seed=3)
    assert (split == "test").sum() == 0 and (split == "val").sum() == 20


def test_duplicate_groups_on_256_bit_hashes():
    base = (0xDEADBEEF << 192) | (0x12345678 << 100) | 0xFFFF
    near = base ^ (1 << 250) ^ (1 << 130) ^ (1 << 3)  # 3 bits apart, spread over three words
    far = base ^ ((1 << 200) - 1)  # 200 bits apart
    groups = duplicate_groups(["a", "b", "c"], [base, near, far], max_distance=3)
    assert groups.tolist() == [0, 0, 1]
    assert duplicate_groups(["a", "b", "c"], [base, near, far], max_distance=2).tolist() == [0, 1, 2]
