"""The prepared-dataset format: atomic writer, validating reader, digest."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrexp.config import ImageSpec
from cxrexp.data.store import (
    FORMAT_VERSION,
    MANIFEST_COLUMNS,
    WRITER_LOCK,
    DatasetWriter,
    PreparedDataError,
    dataset_digest,
    open_prepared,
    spec_dict,
)

SIZE = 16


def manifest_frame(rows: list[int], labels: list[int], splits: list[str], shas: list[str] | None = None,
                   phashes: list[str] | None = None, has_mask: list[bool] | None = None) -> pd.DataFrame:
    n = len(rows)
    return pd.DataFrame(
        {
            "row": rows,
            "source": [f"/data/{'COVID' if lab else 'Normal'}/images/{r}.png" for r, lab in zip(rows, labels)],
            "class_name": ["COVID" if lab else "Normal" for lab in labels],
            "label": labels,
            "split": splits,
            "sha256": shas or [f"{r:064x}" for r in rows],
            "phash": phashes or [f"{r:016x}" for r in rows],
            "dup_group": list(range(n)),
            "group": list(range(n)),
            "patient_id": [""] * n,
            "has_mask": has_mask or [False] * n,
            "width": [SIZE] * n,
            "height": [SIZE] * n,
        }
    )


def params_dict(source: str = "/data") -> dict:
    return {
        "image_spec": spec_dict(ImageSpec(image_size=SIZE)),
        "classes": ["COVID", "Normal"],
        "positive_class": "COVID",
        "val_frac": 0.1,
        "test_frac": 0.1,
        "seed": 42,
        "source": source,
        "notes": [],
        "layout": "kaggle",
    }


def row_image(row: int) -> np.ndarray:
    return np.full((SIZE, SIZE), 10 * row + 1, dtype=np.uint8)


def write_dataset(out_dir: Path, key: str = "ds", capacity: int = 5, skipped_rows: tuple[int, ...] = (2,)):
    """Rows 0..capacity-1 except ``skipped_rows``; row 1 carries a mask; returns the PreparedDataset."""
    kept = [r for r in range(capacity) if r not in skipped_rows]
    labels = [r % 2 for r in kept]
    splits = (["train", "val", "test"] * capacity)[: len(kept)]
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[2:6, 1:4] = 1
    with DatasetWriter(out_dir, key, capacity, SIZE) as writer:
        for r in reversed(kept):  # out of order, as a worker pool delivers them
            writer.write(r, row_image(r), mask if r == 1 else None)
        skipped = pd.DataFrame({"path": [f"/data/bad{r}.png" for r in skipped_rows],
                                "reason": ["empty file"] * len(skipped_rows)})
        return writer.finish(manifest_frame(kept, labels, splits, has_mask=[r == 1 for r in kept]),
                             params_dict(), skipped)


def leftovers(out_dir: Path) -> list[str]:
    """What a run left in ``out_dir``, without the per-key lock files (empty, kept on purpose: deleting
    a lock file others may be waiting on would let two writers hold "the" lock at once)."""
    return sorted(p.name for p in out_dir.iterdir() if not p.name.endswith(".lock")) if out_dir.exists() else []


# ------------------------------------------------------------------------------ round trip


def test_round_trip(tmp_path):
    dataset = write_dataset(tmp_path)
    assert leftovers(tmp_path) == ["ds"]  # no temp folder beside it
    reopened = open_prepared(tmp_path / "ds")
    assert reopened.digest == dataset.digest == (tmp_path / "ds" / "COMPLETE").read_text().strip()
    assert reopened.spec == ImageSpec(image_size=SIZE)
    assert reopened.params["format_version"] == FORMAT_VERSION
    assert list(reopened.manifest.columns) == MANIFEST_COLUMNS
    assert reopened.manifest["row"].tolist() == [0, 1, 3, 4]

    images, masks = reopened.images(), reopened.masks()
    assert images.shape == masks.shape == (5, SIZE, SIZE) and images.dtype == np.uint8
    for r in (0, 1, 3, 4):
        np.testing.assert_array_equal(images[r], row_image(r))
    assert not images[2].any()  # the skipped row stays a zero hole
    assert masks[1].sum() == 12 and masks[[0, 3, 4]].sum() == 0
    assert reopened.has_masks and reopened.manifest["has_mask"].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="read-only"):
        images[0, 0, 0] = 1

    rows, labels = reopened.split_rows("train")
    assert rows.dtype == labels.dtype == np.int64
    assert rows.tolist() == [0, 4] and labels.tolist() == [0, 0]
    assert reopened.split_rows("val")[0].tolist() == [1]
    assert reopened.skipped().to_dict("records") == [{"path": "/data/bad2.png", "reason": "empty file"}]
    with pytest.raises(PreparedDataError, match="split 'holdout' is not one of"):
        reopened.split_rows("holdout")


def test_text_columns_survive_round_trip(tmp_path):
    # Hashes that look like numbers: an all-digit hex with leading zeros and one that parses as a float.
    phashes = ["0000000000001234", "12e4000000000000"]
    shas = ["0" * 63 + "7", "1e5" + "0" * 61]
    with DatasetWriter(tmp_path, "ds", 2, SIZE) as writer:
        for r in (0, 1):
            writer.write(r, row_image(r), None)
        dataset = writer.finish(manifest_frame([0, 1], [1, 0], ["train", "train"], shas=shas, phashes=phashes),
                                params_dict(), pd.DataFrame(columns=["path", "reason"]))
    assert dataset.manifest["phash"].tolist() == phashes
    assert dataset.manifest["sha256"].tolist() == shas
    assert dataset.manifest["patient_id"].tolist() == ["", ""]
    assert dataset.skipped().empty


@pytest.mark.parametrize(
    "image, mask, error, fragment",
    [
        (np.zeros((SIZE + 1, SIZE), np.uint8), None, ValueError, rf"uint8 \({SIZE + 1}, {SIZE}\)"),
        (np.zeros((SIZE, SIZE), np.float32), None, ValueError, "float32"),
        (np.zeros((SIZE, SIZE), np.uint8), np.zeros((4, 4), np.uint8), ValueError, "mask for row 0"),
    ],
)
def test_write_rejects_wrong_rows(tmp_path, image, mask, error, fragment):
    with pytest.raises(error, match=fragment):
        with DatasetWriter(tmp_path, "ds", 2, SIZE) as writer:
            writer.write(0, image, mask)
    assert leftovers(tmp_path) == []


def test_write_rejects_row_outside_capacity(tmp_path):
    with DatasetWriter(tmp_path, "ds", 2, SIZE) as writer:
        with pytest.raises(IndexError, match="row 2 is outside 0..1"):
            writer.write(2, row_image(0), None)
        writer.abort()
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ atomicity


def test_aborted_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="worker died"):
        with DatasetWriter(tmp_path, "ds", 3, SIZE) as writer:
            writer.write(0, row_image(0), None)
            assert writer.tmp.is_dir() and writer.tmp.name.startswith(f".ds.tmp-{os.getpid()}-")
            raise RuntimeError("worker died")
    assert leftovers(tmp_path) == []
    with pytest.raises(PreparedDataError, match="does not exist"):
        open_prepared(tmp_path / "ds")


def test_failing_finish_leaves_nothing(tmp_path):
    bad_manifest = manifest_frame([0], [1], ["train"]).drop(columns=["phash"])
    with pytest.raises(KeyError):
        with DatasetWriter(tmp_path, "ds", 1, SIZE) as writer:
            writer.write(0, row_image(0), None)
            writer.finish(bad_manifest, params_dict(), pd.DataFrame(columns=["path", "reason"]))
    assert leftovers(tmp_path) == []


def test_finish_replaces_an_incomplete_folder_and_keeps_a_complete_one(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "images.npy").write_bytes(b"half written by hand")
    first = write_dataset(tmp_path)
    assert open_prepared(tmp_path / "ds").digest == first.digest
    # A second writer of the same key (a concurrent run that lost the race) keeps the first result.
    with DatasetWriter(tmp_path, "ds", 5, SIZE) as writer:
        writer.write(0, np.full((SIZE, SIZE), 99, np.uint8), None)
        kept = writer.finish(manifest_frame([0], [1], ["train"]), params_dict(), pd.DataFrame(columns=["path", "reason"]))
    assert kept.digest == first.digest and kept.images()[0, 0, 0] == 1
    assert leftovers(tmp_path) == ["ds"]


def _temp_folder(parent: Path, name: str, *, lock_file: bool, age_seconds: float = 0) -> Path:
    folder = parent / name
    folder.mkdir()
    (folder / "images.npy").write_bytes(b"half written")
    if lock_file:
        (folder / WRITER_LOCK).touch()
    stamp = time.time() - age_seconds
    os.utime(folder, (stamp, stamp))
    return folder


def test_stale_temp_folders_of_gone_writers_are_removed_for_every_key(tmp_path):
    # A writer holds a lock on WRITING inside its folder for its whole life; the kernel drops it when
    # the process dies, however it dies, so pids (reused; meaningless on another machine) are not trusted.
    dead_same_key = _temp_folder(tmp_path, ".ds.tmp-1-aaaa", lock_file=True)
    dead_other_key = _temp_folder(tmp_path, ".other.tmp-2-bbbb", lock_file=True)
    live_other_key = _temp_folder(tmp_path, ".live.tmp-3-cccc", lock_file=True)
    legacy_old = _temp_folder(tmp_path, ".older.tmp-4-dddd", lock_file=False, age_seconds=2 * 3600)
    just_created = _temp_folder(tmp_path, ".new.tmp-5-eeee", lock_file=False)
    old_copy = _temp_folder(tmp_path, ".ds.old-6-ffff", lock_file=False, age_seconds=2 * 3600)
    holder = os.open(live_other_key / WRITER_LOCK, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: conflicts like another process
        write_dataset(tmp_path)
    finally:
        os.close(holder)
    remaining = leftovers(tmp_path)
    assert remaining == sorted([live_other_key.name, just_created.name, "ds"])
    for gone in (dead_same_key, dead_other_key, legacy_old, old_copy):
        assert not gone.exists()


_RACER = """
import sys, time
from pathlib import Path
import numpy as np, pandas as pd
sys.path.insert(0, {tests!r})
from test_store import manifest_frame, params_dict, row_image, SIZE
import cxrexp.data.store as store
from cxrexp.data.store import DatasetWriter
# A slow file system: the gap between "is there a finished dataset?" and the rename grows to 0.3 s,
# so without the key lock every racer sees none and renames onto the others.
_checked = store._is_valid
store._is_valid = lambda path: (_checked(path), time.sleep(0.3))[0]
out, go, value = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
with DatasetWriter(out, "ds", 2, SIZE) as writer:
    writer.write(0, np.full((SIZE, SIZE), value, np.uint8), None)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    kept = writer.finish(manifest_frame([0], [1], ["train"]), params_dict(), pd.DataFrame(columns=["path", "reason"]))
print("kept", int(kept.images()[0, 0, 0]), flush=True)
"""


def test_writers_finishing_the_same_key_at_once_keep_exactly_one_result(tmp_path):
    """Four processes finish the same key at the same instant: every one must return a valid dataset,
    all the same one, with nothing else left behind (before the key lock, losers of the rename race
    failed with ENOTEMPTY, and a loser that found the folder "damaged" could delete the winner's)."""
    script = tmp_path / "racer.py"
    script.write_text(_RACER.format(tests=str(Path(__file__).parent)))
    out, go = tmp_path / "out", tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, str(script), str(out), str(go), str(10 + i)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    try:
        for racer in racers:
            assert racer.stdout.readline().strip() == "ready"
        go.touch()
        results = [racer.communicate(timeout=120) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
    assert [racer.returncode for racer in racers] == [0] * 4, [err for _, err in results]
    kept = {line.split()[1] for out_text, _ in results for line in out_text.splitlines() if line.startswith("kept")}
    assert len(kept) == 1
    assert leftovers(out) == ["ds"]
    assert str(int(open_prepared(out / "ds").images()[0, 0, 0])) in kept


# ------------------------------------------------------------------------------ reader errors


def _remove(path: Path, name: str) -> None:
    (path / name).unlink()


def _set_format(path: Path, value) -> None:
    params = json.loads((path / "params.json").read_text())
    params["format_version"] = value
    (path / "params.json").write_text(json.dumps(params))


def _corrupt_params(path: Path) -> None:
    (path / "params.json").write_text("{not json")


def _drop_column(path: Path) -> None:
    frame = pd.read_csv(path / "manifest.csv")
    frame.drop(columns=["split"]).to_csv(path / "manifest.csv", index=False)


def _wrong_size(path: Path) -> None:
    np.save(path / "images.npy", np.zeros((5, SIZE, SIZE + 1), np.uint8))


def _too_few_rows(path: Path) -> None:
    np.save(path / "masks.npy", np.zeros((3, SIZE, SIZE), np.uint8))


@pytest.mark.parametrize(
    "damage, fragments",
    [
        (lambda p: _remove(p, "COMPLETE"), ["is incomplete", "no COMPLETE marker", "run preprocess again"]),
        (lambda p: _remove(p, "images.npy"), ["lacks images.npy", "run preprocess again"]),
        (lambda p: _remove(p, "skipped.csv"), ["lacks skipped.csv"]),
        (lambda p: _set_format(p, FORMAT_VERSION + 1), [f"format_version {FORMAT_VERSION + 1}",
                                                        f"reads {FORMAT_VERSION}", "run preprocess again"]),
        (lambda p: _set_format(p, None), ["format_version None"]),
        (_corrupt_params, ["params.json is unreadable"]),
        (_drop_column, ["manifest.csv has columns", "expected"]),
        (_wrong_size, [f"images.npy holds uint8 (5, {SIZE}, {SIZE + 1})", f"expected uint8 (>= 5, {SIZE}, {SIZE})"]),
        (_too_few_rows, [f"masks.npy holds uint8 (3, {SIZE}, {SIZE})"]),
    ],
    ids=["no-complete", "no-images", "no-skipped", "newer-format", "no-format", "bad-json", "bad-manifest",
         "wrong-image-size", "too-few-rows"],
)
def test_open_prepared_errors(tmp_path, damage, fragments):
    write_dataset(tmp_path)
    damage(tmp_path / "ds")
    with pytest.raises(PreparedDataError) as info:
        open_prepared(tmp_path / "ds")
    message = str(info.value)
    assert str(tmp_path / "ds") in message  # names the folder
    for fragment in fragments:
        assert fragment in message


def test_open_prepared_missing_folder(tmp_path):
    with pytest.raises(PreparedDataError, match=r"does not exist: run `mlflow run . -e preprocess` first"):
        open_prepared(tmp_path / "nowhere")


# ------------------------------------------------------------------------------ digest


BASE = manifest_frame([0, 1, 2, 3], [1, 0, 1, 0], ["train", "train", "val", "test"])


def _changed(column: str, value) -> pd.DataFrame:
    frame = BASE.copy()
    frame.loc[1, column] = value
    return frame


def test_digest_is_stable():
    digest = dataset_digest(BASE, params_dict())
    assert digest == dataset_digest(BASE.copy(), dict(reversed(list(params_dict().items()))))
    assert len(digest) == 16 and int(digest, 16) >= 0


@pytest.mark.parametrize(
    "manifest, params, same",
    [
        (BASE, params_dict(source="/elsewhere/copy"), True),  # where the data lives is not what it is
        (BASE, {**params_dict(), "notes": ["a note"], "layout": "plain", "cache_key": "x"}, True),
        (_changed("source", "/moved/Normal/images/1.png"), params_dict(), True),
        (_changed("label", 1), params_dict(), False),
        (_changed("split", "test"), params_dict(), False),
        (_changed("sha256", "f" * 64), params_dict(), False),
        (BASE, {**params_dict(), "image_spec": spec_dict(ImageSpec(image_size=SIZE, clip_limit=3.0))}, False),
        (BASE, {**params_dict(), "seed": 7}, False),
    ],
    ids=["source-folder", "notes-layout-key", "source-column", "label", "split", "content", "spec", "seed"],
)
def test_digest_sensitivity(manifest, params, same):
    assert (dataset_digest(manifest, params) == dataset_digest(BASE, params_dict())) is same


def test_digest_written_by_finish_matches(tmp_path):
    dataset = write_dataset(tmp_path)
    params = {k: v for k, v in dataset.params.items() if k != "digest"}
    assert dataset.digest == dataset_digest(dataset.manifest, params)


@pytest.mark.parametrize("stored, lungs, aspect, clip", [
    # written before lung views existed: a whole-image spec, whatever today's default view is
    ({"image_size": 32, "enhance": "clahe", "clip_limit": 2.0, "tile_grid": 8, "gamma": 0.8}, "none", "pad", 2.0),
    # written with lung views, before stretch became the default: it was padded
    ({"image_size": 32, "enhance": "clahe", "clip_limit": 2.0, "tile_grid": 8, "gamma": 0.8, "lungs": "crop",
      "lung_model": "models:/s/1", "lung_margin": 0.05, "lung_fill": 0}, "crop", "pad", 2.0),
    # written in full: read as written
    ({"image_size": 32, "enhance": "clahe", "clip_limit": 40.0, "tile_grid": 8, "gamma": 0.8, "lungs": "crop",
      "lung_model": "models:/s/1", "lung_margin": 0.05, "lung_fill": 0, "lung_aspect": "stretch"}, "crop", "stretch", 40.0),
])
def test_a_stored_spec_keeps_the_meaning_it_had_when_it_was_written(stored, lungs, aspect, clip):
    from cxrexp.config import ImageSpec

    spec = ImageSpec.from_stored(stored)
    assert (spec.lungs, spec.lung_aspect, spec.clip_limit) == (lungs, aspect, clip)
    with pytest.raises(TypeError):
        ImageSpec.from_stored({**stored, "no_such_field": 1})
