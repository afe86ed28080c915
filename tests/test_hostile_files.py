"""Hostile files and folders in preprocess (docs/hostile_input.md, "Preprocess"): each case has a
definite outcome, the run goes on, and every file left out is in skipped.csv with its reason."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import imagecodecs
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrexp.data import discovery, pipeline
from cxrexp.data.pipeline import run_preprocess
from cxrexp.errors import DatasetError, UserError, WorkerDied
from cxrexp.images import decode

from .test_pipeline import config, encode, smooth_image

NON_UTF8 = b"caf\xe9-7.png"  # Latin-1 "café": not valid UTF-8, as copied from an old Windows share
SHARED = smooth_image(900, 64, 64)  # the same file filed under both classes


def _write_name(folder: Path, raw: bytes, data: bytes) -> None:
    with open(os.path.join(os.fsencode(folder), raw), "wb") as handle:
        handle.write(data)


def _build(root: Path) -> Path:
    for c, class_name in enumerate(("COVID", "Normal")):
        folder = root / class_name / "images"
        folder.mkdir(parents=True)
        for i in range(6):
            (folder / f"{class_name}-{i}.png").write_bytes(encode(smooth_image(100 * c + i, 64, 64), "png8"))
        (folder / "shared.png").write_bytes(encode(SHARED, "png8"))
    covid = root / "COVID" / "images"
    os.mkfifo(covid / "fifo.png")  # opening it for reading would wait for a writer forever
    os.symlink(covid / "nowhere.png", covid / "broken.png")
    os.symlink(covid / "loop.png", covid / "loop.png")
    os.symlink(root / "Normal" / "images" / "loopdir", root / "Normal" / "images" / "loopdir")
    _write_name(covid, NON_UTF8, encode(smooth_image(7, 64, 64), "png8"))
    _write_name(covid, b"bad-\xff.png", b"not an image")
    (covid / "vanishing.png").write_bytes(encode(smooth_image(8, 64, 64), "png8"))
    (covid / "locked.png").write_bytes(encode(smooth_image(9, 64, 64), "png8"))
    return root


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One preprocess run over every hostile case at once: (result, data root)."""
    root = _build(tmp_path_factory.mktemp("hostile"))
    patch = pytest.MonkeyPatch()
    listed = discovery.discover

    def discover_then_delete(*args, **kwargs):
        found = listed(*args, **kwargs)
        (root / "COVID" / "images" / "vanishing.png").unlink()  # gone between listing and reading
        return found

    opened = decode.os.open

    def permission_denied(path, *args, **kwargs):
        # Running as root, chmod cannot make a file unreadable; this is what open(2) answers a user.
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied")
        return opened(path, *args, **kwargs)

    patch.setattr(discovery, "discover", discover_then_delete)
    patch.setattr(decode.os, "open", permission_denied)
    try:
        result = run_preprocess(config(root, tmp_path_factory.mktemp("out")), progress=False)
    finally:
        patch.undo()
    return result, root


def _reasons(result) -> dict[str, str]:
    return {Path(p).name: r for p, r in result.skipped.itertuples(index=False)}


@pytest.mark.timeout(120)  # a FIFO opened for reading would hang here, not fail
@pytest.mark.parametrize(
    "name, reason",
    [
        ("fifo.png", "not a regular file: a FIFO"),
        ("broken.png", "broken symlink (its target does not exist)"),
        ("loop.png", "symlink loop"),
        ("loopdir", "symlink loop"),
        ("vanishing.png", "cannot read: No such file or directory"),
        ("locked.png", "cannot read: Permission denied"),
        ("bad-\\xff.png", "not an image"),
    ],
)
def test_each_hostile_entry_is_skipped_with_its_reason(hostile, name, reason):
    assert _reasons(hostile[0])[name] == reason


def test_a_file_in_two_classes_is_excluded_from_both_and_reported(hostile):
    result, root = hostile
    reasons = _reasons(result)
    shared = result.skipped[result.skipped["path"].str.endswith("shared.png")]
    assert len(shared) == 2  # one row per copy
    assert "its label is ambiguous, excluded from both classes" in reasons["shared.png"]
    assert {Path(p).parent.parent.name for p in shared["path"]} == {"COVID", "Normal"}
    assert not result.dataset.manifest["source"].str.endswith("shared.png").any()


def test_a_name_that_is_not_utf8_is_kept_and_reported(hostile):
    result, root = hostile
    manifest = result.dataset.manifest
    kept = manifest[manifest["source"].str.endswith("caf\\xe9-7.png")]
    assert len(kept) == 1 and kept["class_name"].iloc[0] == "COVID"
    assert any("not valid UTF-8" in note for note in result.dataset.params["notes"])
    # The tables on disk are valid UTF-8 (to_csv used to raise UnicodeEncodeError after all the decoding).
    for table in ("manifest.csv", "skipped.csv"):
        (result.dataset.root / table).read_bytes().decode("utf-8")


def test_the_good_files_all_arrive(hostile):
    result, _ = hostile
    counts = result.dataset.manifest["class_name"].value_counts().to_dict()
    assert counts == {"COVID": 7, "Normal": 6}  # 6 each (shared.png excluded) + the non-UTF-8 name


def test_a_class_folder_that_cannot_be_listed_names_it(tmp_path, monkeypatch):
    root = tmp_path / "data"
    for class_name in ("COVID", "Normal"):
        (root / class_name).mkdir(parents=True)
        (root / class_name / "a.png").write_bytes(encode(smooth_image(1, 64, 64), "png8"))
    scandir = discovery.os.scandir

    def refuse(path):
        if str(path).endswith("Normal"):
            raise PermissionError(13, "Permission denied")
        return scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", refuse)
    with pytest.raises(DatasetError, match=r"cannot list .*Normal: Permission denied"):
        discovery.discover(root, ("COVID", "Normal"), "COVID")


# ------------------------------------------------------------------------------ file bytes


def _jpeg(grey: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _cmyk() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.stack([SHARED] * 4, -1), "CMYK").save(out, "JPEG")
    return out.getvalue()


def _apng() -> bytes:
    out = io.BytesIO()
    first, second = Image.fromarray(SHARED), Image.fromarray(255 - SHARED)
    first.save(out, "PNG", save_all=True, append_images=[second])
    return out.getvalue()


def _many_png_chunks(count: int) -> bytes:
    png = encode(SHARED, "png8")
    empty = struct.pack(">I", 0) + b"teXt" + struct.pack(">I", zlib.crc32(b"teXt"))
    return png[:33] + empty * count + png[33:]


def _cut_jpeg_with_eoi() -> bytes:
    data = _jpeg(SHARED)
    return data[: len(data) // 2] + b"\xff\xd9"


# (case, bytes, expected: "accepted" or the rejection reason). Pathological sizes are kept small for
# speed; the walks are bounded by count (MAX_JPEG_SEGMENTS, PNG_CHUNK_ALLOWANCE), so a 60 MiB file
# is rejected after as few steps as these.
BYTE_CASES = [
    ("CMYK JPEG", _cmyk, "unsupported colour: CMYK/YCCK JPEG (save it as greyscale PNG or JPEG)"),
    ("12-bit JPEG", lambda: imagecodecs.jpeg8_encode(SHARED.astype(np.uint16) * 16, bitspersample=12), "accepted"),
    ("16-bit lossless JPEG", lambda: imagecodecs.jpeg8_encode(SHARED.astype(np.uint16) * 257, lossless=True,
                                                              bitspersample=16), "accepted"),
    ("8-bit lossless JPEG", lambda: imagecodecs.jpeg8_encode(SHARED, lossless=True), "accepted"),
    ("APNG", _apng, "accepted"),
    ("DICOM named .png", lambda: b"\0" * 128 + b"DICM" + b"\0" * 400, "unsupported format: DICOM"),
    ("JPEG cut short, FF D9 appended", _cut_jpeg_with_eoi, "accepted"),
    ("a run of FF after SOI", lambda: b"\xff\xd8" + b"\xff" * (8 << 20), "truncated or corrupt"),
    ("a million empty JPEG segments", lambda: b"\xff\xd8" + b"\xff\xe0\x00\x02" * 1_000_000,
     f"pathological JPEG: more than {decode.MAX_JPEG_SEGMENTS} marker segments before the image data"),
    ("a million empty PNG chunks", lambda: _many_png_chunks(1_000_000),
     f"pathological PNG: more than {decode.PNG_CHUNK_ALLOWANCE} + 1 per {decode.PNG_BYTES_PER_CHUNK} bytes chunks"),
]


@pytest.mark.parametrize("case, make, expected", BYTE_CASES, ids=[c[0] for c in BYTE_CASES])
def test_each_kind_of_file_has_a_definite_outcome(case, make, expected):
    data = make()
    if expected != "accepted":
        with pytest.raises(decode.ImageRejected) as err:
            decode.decode_grey(data)
        assert err.value.reason == expected
        return
    grey = decode.decode_grey(data)
    assert grey.shape == SHARED.shape and grey.dtype == np.uint8
    if case == "APNG":
        np.testing.assert_array_equal(grey, SHARED)  # the default image (first frame); later frames unused
    elif case != "JPEG cut short, FF D9 appended":
        # High-precision JPEGs are stretched over their own range (decode.to_uint8), as 16-bit PNGs are.
        assert np.corrcoef(grey.ravel(), SHARED.ravel())[0, 1] > 0.99


def test_a_fifo_or_an_oversized_file_is_refused_before_a_byte_is_read(tmp_path):
    os.mkfifo(tmp_path / "x.png")
    with pytest.raises(decode.ImageRejected, match="not a regular file: a FIFO"):
        decode.read_bytes(tmp_path / "x.png")
    (tmp_path / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(decode.ImageRejected, match=r"too large: file of 5000 bytes \(maximum 4000\)"):
        decode.read_bytes(tmp_path / "big.png", max_bytes=4000)
    assert decode.max_file_bytes(1000) == 1000 * decode.BYTES_PER_PIXEL_LIMIT


# ------------------------------------------------------------------------------ a worker killed mid-run

_KILLED = """
import os, signal, sys
from cxrexp.config import PreprocessConfig
from cxrexp.data import files, pipeline
from cxrexp.errors import WorkerDied
real = files.process_file
def process_file(path, *args, **kwargs):
    if path.endswith("Normal-3.png"):
        os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
    return real(path, *args, **kwargs)
files.process_file = process_file
pipeline._start_method = lambda: "fork"  # the patch reaches the workers; this process has no TensorFlow
cfg = PreprocessConfig.flat(data_dir=sys.argv[1], out_dir=sys.argv[2], image_size=32, workers=2, lungs="none")
try:
    pipeline.run_preprocess(cfg, progress=False)
except WorkerDied as err:
    print(err, file=sys.stderr)
    sys.exit(3)
"""


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_run_ends_the_run_with_a_clear_error(tmp_path):
    """multiprocessing.Pool.imap_unordered waited forever for a killed worker's chunk; the run must
    end (the subprocess's timeout is only a hang guard, not a speed claim) and keep nothing."""
    root = tmp_path / "data"
    for c, class_name in enumerate(("COVID", "Normal")):
        (root / class_name).mkdir(parents=True)
        for i in range(8):
            (root / class_name / f"{class_name}-{i}.png").write_bytes(encode(smooth_image(10 * c + i, 64, 64), "png8"))
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(_KILLED)
    done = subprocess.run([sys.executable, str(script), str(root), str(out)], capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "a preprocess worker process died abruptly" in done.stderr
    assert "Nothing was kept" in done.stderr and "-P workers=1" in done.stderr
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert [name for name in left if not name.endswith(".lock")] == []  # no dataset, no temporary folder
    assert issubclass(WorkerDied, UserError)  # the CLI prints it as one line and exits 2


def test_cross_class_duplicates_table():
    found = pipeline.splitting.cross_class_duplicates(
        ["a", "b", "a", "c", "a", ""], ["X", "X", "Y", "Y", "X", "Y"], ["x1", "x2", "y1", "y2", "x3", "y3"])
    assert sorted(found) == [0, 2, 4]  # every copy of "a"; "" (not hashed) never matches
    assert found[2].startswith("same bytes as x1 in class X (and 1 more)")
    assert found[0].startswith("same bytes as y1 in class Y:")
    assert pd.Series(list(found.values())).str.endswith("excluded from both classes").all()
