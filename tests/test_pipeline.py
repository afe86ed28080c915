"""run_preprocess end to end on small dataset trees built here (and on cxr-mini when present)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrexp.config import PreprocessConfig
from cxrexp.data import pipeline, store
from cxrexp.data.discovery import DatasetError
from cxrexp.data.pipeline import run_preprocess
from cxrexp.data.store import PreparedDataError, open_prepared
from cxrexp.images import decode, transforms

from .conftest import tiny_preprocess_config

SIZE = 32  # stored image side: small keeps every run well under a second


# ------------------------------------------------------------------------------ test images


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """uint8 HxW: a tilted gradient plus a few random Gaussian blobs, different for every seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    img = 0.5 + 0.3 * (xx - 0.5) * rng.uniform(-1, 1) + 0.3 * (yy - 0.5) * rng.uniform(-1, 1)
    for _ in range(5):
        cx, cy = rng.uniform(0, 1, 2)
        sigma = rng.uniform(0.06, 0.18)
        img += rng.uniform(-0.6, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    img = (img - img.min()) / (img.max() - img.min() + 1e-9)
    return np.rint(20 + 215 * img).astype(np.uint8)


def encode(grey: np.ndarray, kind: str) -> bytes:
    """The grey image as a file of ``kind``: png8, png16, png-rgb, png-rgba, jpg, jpg-grey."""
    if kind == "png8":
        ok, buf = cv2.imencode(".png", grey)
    elif kind == "png16":
        ok, buf = cv2.imencode(".png", grey.astype(np.uint16) * 64)  # a 14-bit detector's range
    elif kind == "png-rgb":
        ok, buf = cv2.imencode(".png", cv2.merge([grey, grey, grey]))
    elif kind == "png-rgba":
        ok, buf = cv2.imencode(".png", cv2.merge([grey, grey, grey, np.full_like(grey, 255)]))
    elif kind == "jpg":
        ok, buf = cv2.imencode(".jpg", cv2.merge([grey, grey, grey]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    elif kind == "jpg-grey":
        ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 92])
    else:
        raise AssertionError(kind)
    assert ok
    return buf.tobytes()


def png_header_only(width: int, height: int) -> bytes:
    """A structurally valid PNG (IHDR + IEND, no pixel data) claiming width x height: a tiny bomb."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def gif_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(smooth_image(99, 48, 48)).save(buf, format="GIF")
    return buf.getvalue()


def half_mask(height: int, width: int, side: str) -> np.ndarray:
    """0/255 mask: the left or the top half white."""
    mask = np.zeros((height, width), np.uint8)
    if side == "left":
        mask[:, : width // 2] = 255
    else:
        mask[: height // 2, :] = 255
    return mask


# (class, file name, seed, height, width, encoding)
GOOD = [
    ("COVID", "COVID-1.png", 1, 96, 96, "png8"),
    ("COVID", "COVID-2.png", 2, 80, 100, "png-rgb"),
    ("COVID", "COVID-3.png", 3, 64, 64, "png16"),
    ("COVID", "COVID-4.png", 4, 72, 90, "png-rgba"),
    ("COVID", "COVID-5.jpg", 5, 100, 100, "jpg"),
    ("COVID", "COVID-6.png", 6, 64, 64, "png8"),
    ("COVID", "COVID-7.png", 7, 64, 64, "png8"),
    ("COVID", "COVID-8.png", 8, 64, 64, "png8"),
    ("COVID", "COVID-9.jpeg", 9, 70, 70, "jpg-grey"),
    ("COVID", "COVID-10.png", 10, 90, 90, "png8"),
    ("COVID", "COVID-11.png", 11, 64, 80, "png-rgb"),
    ("COVID", "COVID-12.png", 12, 48, 48, "png8"),
] + [
    ("Normal", f"Normal-{i}.{'jpg' if i % 4 == 0 else 'png'}", 100 + i, 56 + 4 * i, 64 + 2 * i,
     ["png8", "png-rgb", "png16", "png-rgba", "jpg"][i % 5])
    for i in range(1, 15)
]
# Duplicates: an exact copy of the file, and a near duplicate (re-encoded as JPEG, slightly noised).
EXACT_COPY = ("COVID", "COVID-1-copy.png", "COVID-1.png")
NEAR_COPY = ("COVID", "COVID-10-near.jpg", "COVID-10.png")
PATIENT_P1 = ["COVID-6", "COVID-7", "COVID-8"]
BAD = {
    ("COVID", "bad-empty.png"): (b"", "empty file"),
    ("COVID", "bad-truncated.png"): (None, "truncated or corrupt"),
    ("COVID", "bad-text.png"): (b"this is a text file, renamed\n", "not an image"),
    ("Normal", "bad-truncated.jpg"): (None, "truncated or corrupt"),
    ("Normal", "bad.gif"): (None, "unsupported format: GIF"),
    ("Normal", "bad-tiny.png"): (None, "too small: 10x10 px (minimum 32)"),
    ("Normal", "bad-bomb.png"): (png_header_only(30000, 30000), "too large: 30000x30000 = 900000000 px (maximum 64000000)"),
}
MASKS = {  # image file -> (mask height, width, half)
    ("COVID", "COVID-1.png"): (64, 64, "left"),
    ("COVID", "COVID-2.png"): (128, 96, "top"),
    ("Normal", "Normal-1.png"): (64, 32, "left"),
}
BROKEN_MASK = ("COVID", "COVID-4.png")  # its mask file is garbage: the image stays, without a mask


def build_tree(root: Path) -> Path:
    """The Kaggle layout with masks, metadata, duplicates and the bad-input corpus."""
    greys = {}
    for class_name, name, seed, height, width, kind in GOOD:
        greys[name] = smooth_image(seed, height, width)
        path = root / class_name / "images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(greys[name], kind))
    class_name, name, original = EXACT_COPY
    (root / class_name / "images" / name).write_bytes((root / class_name / "images" / original).read_bytes())
    class_name, name, original = NEAR_COPY
    noisy = greys[original].astype(np.int16) + np.random.default_rng(0).integers(-2, 3, greys[original].shape)
    (root / class_name / "images" / name).write_bytes(encode(np.clip(noisy, 0, 255).astype(np.uint8), "jpg"))

    good_png = encode(smooth_image(500, 64, 64), "png-rgb")
    good_jpg = encode(smooth_image(501, 64, 64), "jpg")
    defaults = {
        "bad-truncated.png": good_png[: len(good_png) // 2],
        "bad-truncated.jpg": good_jpg[: len(good_jpg) // 2],
        "bad.gif": gif_bytes(),
        "bad-tiny.png": encode(smooth_image(502, 10, 10), "png8"),
    }
    for (class_name, name), (data, _) in BAD.items():
        (root / class_name / "images" / name).write_bytes(data if data is not None else defaults[name])

    for (class_name, name), (height, width, side) in MASKS.items():
        path = root / class_name / "masks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(half_mask(height, width, side), "png8"))
    (root / BROKEN_MASK[0] / "masks" / BROKEN_MASK[1]).write_bytes(b"not a mask")

    pd.DataFrame(
        {
            "FILE NAME": PATIENT_P1 + ["COVID-1"],
            "FORMAT": "PNG",
            "SIZE": "64*64",
            "URL": "https://example.org",
            "PATIENT ID": ["P1", "P1", "P1", "P2"],
        }
    ).to_excel(root / "COVID.metadata.xlsx", index=False)
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root (folders too) with its (mtime_ns, size)."""
    out = {}
    for path in [root, *sorted(root.rglob("*"))]:
        st = path.stat()
        out[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
    return out


def folder_entries(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else []


def config(data_dir: Path, out_dir: Path, **overrides) -> PreprocessConfig:
    settings = dict(data_dir=str(data_dir), out_dir=str(out_dir), image_size=SIZE, workers=1,
                    val_frac=0.2, test_frac=0.2, lungs="none")
    settings.update(overrides)
    return PreprocessConfig.flat(**settings)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = build_tree(tmp_path_factory.mktemp("data"))
    return root, snapshot(root)


@pytest.fixture(scope="module")
def prepared(tree, tmp_path_factory):
    root, _ = tree
    out = tmp_path_factory.mktemp("prepared")
    return run_preprocess(config(root, out), progress=False), out


def by_name(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.assign(name=manifest["source"].map(lambda s: Path(s).name)).set_index("name")


# ------------------------------------------------------------------------------ the happy path


def test_every_good_file_kept_with_its_class(prepared):
    result, _ = prepared
    manifest = by_name(result.dataset.manifest)
    expected = {name: cls for cls, name, *_ in GOOD} | {EXACT_COPY[1]: "COVID", NEAR_COPY[1]: "COVID"}
    assert manifest["class_name"].to_dict() == expected
    assert (manifest["label"] == (manifest["class_name"] == "COVID").astype(int)).all()
    assert not result.reused
    assert result.dataset.params["layout"] == "kaggle"
    sizes = {name: (w, h) for _, name, _, h, w, _ in GOOD}
    assert {n: (r.width, r.height) for n, r in manifest.loc[list(sizes)].iterrows()} == sizes


def test_bad_files_skipped_with_reasons(prepared):
    result, _ = prepared
    skipped = result.skipped
    reasons = {(Path(p).parts[-3], Path(p).name): r for p, r in zip(skipped["path"], skipped["reason"])}
    assert reasons == {key: reason for key, (_, reason) in BAD.items()}
    assert skipped["path"].tolist() == sorted(skipped["path"])  # stable order for diffs
    manifest = result.dataset.manifest
    assert not set(skipped["path"]) & set(manifest["source"])


def test_rows_hold_the_prepared_images(prepared):
    """Every stored row is prepare(decode(file)): rows line up with the manifest, whatever the format."""
    result, _ = prepared
    dataset = result.dataset
    images = dataset.images()
    assert images.shape[1:] == (SIZE, SIZE) and images.dtype == np.uint8
    for row, source in zip(dataset.manifest["row"], dataset.manifest["source"]):
        expected = transforms.prepare(decode.read_grey(source), dataset.spec)
        np.testing.assert_array_equal(images[row], expected, err_msg=source)


def test_masks_resized_and_binary(prepared):
    result, _ = prepared
    dataset = result.dataset
    manifest = by_name(dataset.manifest)
    masks = dataset.masks()
    with_mask = {(c, n) for (c, n) in MASKS}
    assert set(manifest.index[manifest["has_mask"]]) == {n for _, n in with_mask}  # the broken one is not
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 1
    top = np.zeros((SIZE, SIZE), np.uint8)
    top[: SIZE // 2, :] = 1
    for (_, name), (_, _, side) in MASKS.items():
        np.testing.assert_array_equal(masks[manifest.at[name, "row"]], left if side == "left" else top, err_msg=name)
    assert set(np.unique(masks)) <= {0, 1}
    no_mask_rows = manifest.loc[~manifest["has_mask"], "row"]
    assert not masks[no_mask_rows.to_numpy()].any()


def test_duplicates_grouped_and_patients_kept_together(tree, tmp_path):
    root, _ = tree
    for seed in (1, 2, 3, 4):  # wide val/test fractions: a group split apart would show within a few seeds
        manifest = by_name(run_preprocess(config(root, tmp_path, seed=seed, val_frac=0.3, test_frac=0.3),
                                          progress=False).dataset.manifest)
        exact = manifest.loc[[EXACT_COPY[1], EXACT_COPY[2]]]
        near = manifest.loc[[NEAR_COPY[1], NEAR_COPY[2]]]
        patient = manifest.loc[[f"{n}.png" for n in PATIENT_P1]]
        for members in (exact, near):
            assert members["dup_group"].nunique() == 1
        assert exact["sha256"].nunique() == 1 and near["sha256"].nunique() == 2
        assert (patient["patient_id"] == "P1").all() and patient["group"].nunique() == 1
        assert manifest.at[EXACT_COPY[2], "patient_id"] == "P2"
        for members in (exact, near, patient):
            assert members["group"].nunique() == 1 and members["split"].nunique() == 1, seed
        # No other file was taken for a duplicate: the test images are genuinely different.
        assert (manifest["dup_group"].value_counts() > 1).sum() == 2
        # Groups never straddle splits, whatever their origin.
        assert (manifest.groupby("group")["split"].nunique() == 1).all()
        assert set(manifest["split"]) == {"train", "val", "test"}


def test_split_is_stratified(prepared):
    manifest = prepared[0].dataset.manifest
    for split in ("train", "val", "test"):
        part = manifest[manifest["split"] == split]
        assert set(part["class_name"]) == {"COVID", "Normal"}, split


# ------------------------------------------------------------------------------ reuse


def test_second_run_reuses_and_changed_parameter_does_not(tree, prepared, monkeypatch):
    root, _ = tree
    first, out = prepared

    def must_not_decode(task):
        raise AssertionError(f"reuse decoded {task.path}")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_process", must_not_decode)
        again = run_preprocess(config(root, out, workers=3), progress=False)  # workers is not a parameter of the data
    assert again.reused  # and nothing was decoded (must_not_decode)
    assert again.dataset.root == first.dataset.root and again.dataset.digest == first.dataset.digest

    changed = run_preprocess(config(root, out, clip_limit=3.0), progress=False)
    assert not changed.reused
    assert changed.dataset.root != first.dataset.root and changed.dataset.digest != first.dataset.digest
    assert changed.dataset.spec.clip_limit == 3.0
    pd.testing.assert_frame_equal(changed.dataset.manifest, first.dataset.manifest)  # hashes predate enhancement
    # No temporary folder is left; the empty per-key lock files (store._key_lock) stay by design.
    assert not any(name.startswith(".") and not name.endswith(".lock") for name in folder_entries(out))


def test_the_cache_key_changes_when_bytes_change_though_size_and_mtime_do_not(tmp_path):
    """An edit followed by `touch -d` (or a tool that restores timestamps): same size, same mtime."""
    import time

    root = build_tree(tmp_path / "data")
    cfg = config(root, tmp_path / "out")
    before = pipeline.prepared_key(cfg)
    victim = next(p for p in sorted(root.rglob("*.png")) if p.stat().st_size > 100)
    stat = victim.stat()
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    time.sleep(0.01)  # a later change time than the one recorded
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size and victim.stat().st_mtime_ns == stat.st_mtime_ns
    assert pipeline.prepared_key(cfg) != before
    assert pipeline.prepared_key(cfg) == pipeline.prepared_key(cfg)  # and stable while nothing changes


@pytest.mark.parametrize("where", ["data", "data/prepared", "data/COVID/out", "link-to-data/sub"])
def test_an_out_dir_inside_the_data_folder_is_refused_before_anything_is_written(tree, tmp_path, where):
    from cxrexp.errors import DatasetError

    root, before = tree
    (tmp_path / "link-to-data").symlink_to(root)
    out = {"data": root, "data/prepared": root / "prepared", "data/COVID/out": root / "COVID" / "out",
           "link-to-data/sub": tmp_path / "link-to-data" / "sub"}[where]
    with pytest.raises(DatasetError, match="never writes into a data folder"):
        run_preprocess(config(root, out), progress=False)
    assert snapshot(root) == before  # nothing created or changed in the data folder


def test_folders_beside_the_classes_are_not_scanned(tmp_path):
    """lost+found, a stray backup folder: only the class folders are listed."""
    root = build_tree(tmp_path / "data")
    for extra in ("lost+found", "backup"):
        (root / extra).mkdir()
        (root / extra / "x.png").write_bytes(b"\x89PNG junk")
    from cxrexp.data import discovery

    found = discovery.discover(root, ("COVID", "Normal"), "COVID")
    assert not any("lost+found" in r.path or "backup" in r.path for r in found.records)


def test_digest_does_not_depend_on_where_the_data_lives(tree, prepared, tmp_path):
    root, _ = tree
    moved = tmp_path / "elsewhere" / "copy"
    moved.parent.mkdir()
    os.symlink(root, moved)  # the same files under another path
    other = run_preprocess(config(moved, tmp_path / "out"), progress=False)
    assert not other.reused  # the path is part of the cache key...
    assert other.dataset.digest == prepared[0].dataset.digest  # ...but not of what the data is


@pytest.mark.timeout(180)  # a fork deadlock would otherwise hang until the global timeout
def test_two_workers_same_result(tree, prepared, tmp_path):
    # This test module has used OpenCV (imencode) in this process before forking: the pool must cope.
    root, _ = tree
    cv2.resize(np.zeros((1500, 1500), np.uint8), (64, 64), interpolation=cv2.INTER_AREA)  # warm OpenCV's pool
    threads_before = cv2.getNumThreads()
    parallel = run_preprocess(config(root, tmp_path, workers=2), progress=False)
    assert cv2.getNumThreads() == threads_before  # the caller's OpenCV setting is restored
    serial = prepared[0].dataset
    assert not parallel.reused
    pd.testing.assert_frame_equal(parallel.dataset.manifest, serial.manifest)
    assert parallel.dataset.digest == serial.digest
    np.testing.assert_array_equal(parallel.dataset.images(), serial.images())
    np.testing.assert_array_equal(parallel.dataset.masks(), serial.masks())
    pd.testing.assert_frame_equal(parallel.skipped, prepared[0].skipped)


@pytest.mark.timeout(300)
def test_spawned_workers_same_result(tree, prepared, tmp_path, monkeypatch):
    # spawn is what the pool uses once TensorFlow is loaded (train's preprocess-on-demand): workers
    # import everything afresh and get the row writer by pickle.
    root, _ = tree
    monkeypatch.setattr(pipeline, "_start_method", lambda: "spawn")
    parallel = run_preprocess(config(root, tmp_path, workers=2), progress=False)
    assert parallel.dataset.digest == prepared[0].dataset.digest
    np.testing.assert_array_equal(parallel.dataset.images(), prepared[0].dataset.images())
    np.testing.assert_array_equal(parallel.dataset.masks(), prepared[0].dataset.masks())


def test_failed_write_ends_the_run(tree, tmp_path, monkeypatch):
    root, _ = tree

    def disk_full(self, row, image, mask):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.RowWriter, "write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run_preprocess(config(root, tmp_path / "out"), progress=False)
    assert folder_entries(tmp_path / "out") == []


def test_data_folder_untouched(tree, prepared, tmp_path):
    root, before = tree
    run_preprocess(config(root, tmp_path, gamma=0.5, enhance="gamma"), progress=False)
    assert snapshot(root) == before
    assert not any(p.name.endswith((".npy", ".csv", ".json")) for p in root.rglob("*"))


# ------------------------------------------------------------------------------ errors


def _all_bad_tree(root: Path) -> Path:
    (root / "COVID" / "images").mkdir(parents=True)
    (root / "Normal" / "images").mkdir(parents=True)
    for i in (1, 2):
        (root / "COVID" / "images" / f"COVID-{i}.png").write_bytes(encode(smooth_image(i, 48, 48), "png8"))
    (root / "Normal" / "images" / "Normal-1.png").write_bytes(b"")
    (root / "Normal" / "images" / "Normal-2.png").write_bytes(b"plain text")
    return root


@pytest.mark.parametrize(
    "case, error, fragments",
    [
        ("missing", DatasetError, ["does not exist", "data_dir"]),
        ("unknown-class", DatasetError, ["class 'Viral'", "Class folders there: 'COVID', 'Normal'"]),
        ("all-bad-class", PreparedDataError, ["['Normal'] have no usable image after skipping 2 file(s)",
                                              "Normal-1.png: empty file", "Normal-2.png: not an image"]),
    ],
)
def test_errors_leave_no_dataset(tree, tmp_path, case, error, fragments):
    out = tmp_path / "out"
    if case == "missing":
        cfg = config(tmp_path / "no-such-folder", out)
    elif case == "unknown-class":
        cfg = config(tree[0], out, classes=("COVID", "Viral"), positive_class="COVID")
    else:
        cfg = config(_all_bad_tree(tmp_path / "bad"), out)
    with pytest.raises(error) as info:
        run_preprocess(cfg, progress=False)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert folder_entries(out) == []  # no dataset, no temporary folder
    if case == "missing":
        assert str(tmp_path / "no-such-folder") in str(info.value)


def test_unusable_cached_dataset_is_rebuilt(tree, tmp_path):
    root, _ = tree
    first = run_preprocess(config(root, tmp_path, seed=11), progress=False)
    (first.dataset.root / "manifest.csv").unlink()  # damaged after the fact
    second = run_preprocess(config(root, tmp_path, seed=11), progress=False)
    assert not second.reused and second.dataset.digest == first.dataset.digest
    assert open_prepared(second.dataset.root).digest == first.dataset.digest


# ------------------------------------------------------------------------------ synthetic


def test_synthetic_with_shortcut(tmp_path):
    base = tiny_preprocess_config(tmp_path, image_size=SIZE, synthetic_count=40, synthetic_size=64, enhance="none")
    plain = run_preprocess(base, progress=False).dataset
    marked = run_preprocess(replace(base, synthetic_shortcut=1.0), progress=False).dataset
    assert marked.params["synthetic"]["shortcut"] == 1.0 and plain.params["synthetic"]["shortcut"] == 0.0
    assert marked.params["source"] == "synthetic" and marked.digest != plain.digest
    assert len(marked.manifest) == 40 and marked.manifest["label"].sum() == round(40 * 0.4)
    assert marked.has_masks and set(np.unique(marked.masks())) == {0, 1}
    pd.testing.assert_series_equal(marked.manifest["label"], plain.manifest["label"])
    # Only the marker differs (shortcut 1.0: exactly the positives carry one).
    differs = (marked.images() != plain.images()).any(axis=(1, 2))
    np.testing.assert_array_equal(differs[marked.manifest["row"]], marked.manifest["label"].to_numpy() == 1)


# ------------------------------------------------------------------------------ real data


def test_cxr_mini(cxr_mini, tmp_path):
    result = run_preprocess(PreprocessConfig.flat(data_dir=str(cxr_mini), out_dir=str(tmp_path), image_size=SIZE,
                                                  lungs="none", exclude=()), progress=False)
    manifest = result.dataset.manifest
    assert len(manifest) == 1200 and result.skipped.empty
    assert manifest["class_name"].value_counts().to_dict() == {"Normal": 800, "COVID": 400}
    counts = manifest["split"].value_counts()
    assert abs(counts["train"] - 960) <= 5 and abs(counts["val"] - 120) <= 5 and abs(counts["test"] - 120) <= 5
    for split in ("train", "val", "test"):
        prevalence = manifest.loc[manifest["split"] == split, "label"].mean()
        assert abs(prevalence - 1 / 3) < 0.02, split
    assert (manifest.groupby("group")["split"].nunique() == 1).all()
    assert (manifest["width"] == 224).all() and not manifest["has_mask"].any()


@pytest.mark.parametrize(
    "name, patterns, expected",
    [
        ("Normal-63.png", ("Normal-6[3-9].png",), "Normal-6[3-9].png"),
        ("Normal-62.png", ("Normal-6[3-9].png",), None),
        ("Normal-1403.png", ("Normal-140[0-3].png", "Normal-1[0-3][0-9][0-9].png"), "Normal-140[0-3].png"),
        ("normal-70.png", ("Normal-*.png",), None),  # case-sensitive on every platform
        ("CHNCXR_0001_0.png", ("*_0.png",), "*_0.png"),
        ("x.png", (), None),
    ],
)
def test_excluded_by(name, patterns, expected):
    from cxrexp.data.discovery import excluded_by

    assert excluded_by(name, patterns) == expected


def test_excluded_files_are_left_out_listed_with_the_pattern_and_change_the_key(tmp_path):
    import pandas as pd

    from cxrexp.errors import DatasetError

    root = tmp_path / "data"
    for i, class_name in enumerate(["COVID", "Normal"] * 4):
        path = root / class_name / "images" / f"{class_name}-{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(smooth_image(i, 48, 48), "png8"))
    plain = config(root, tmp_path / "out")
    cut = config(root, tmp_path / "out", exclude=("Normal-[15].png",))
    assert pipeline.prepared_key(cut) != pipeline.prepared_key(plain)
    result = run_preprocess(cut, progress=False)
    sources = {Path(s).name for s in result.dataset.manifest["source"]}
    assert {"Normal-1.png", "Normal-5.png"}.isdisjoint(sources) and {"Normal-3.png", "Normal-7.png"} <= sources
    skipped = pd.read_csv(result.dataset.root / "skipped.csv")
    listed = dict(zip(skipped["path"].map(lambda s: Path(s).name), skipped["reason"]))
    assert listed["Normal-1.png"] == listed["Normal-5.png"] == "excluded by -P exclude pattern 'Normal-[15].png'"
    assert result.dataset.params["exclude"] == ["Normal-[15].png"]
    with pytest.raises(DatasetError, match=r"class 'Normal': -P exclude=Normal-\* leaves none of the 4 files"):
        run_preprocess(config(root, tmp_path / "out", exclude=("Normal-*",)), progress=False)


def test_the_documented_paediatric_patterns_select_exactly_normal_63_to_1403():
    from cxrexp.data.discovery import PAEDIATRIC_NORMALS, excluded_by

    chosen = [n for n in range(1, 10193) if excluded_by(f"Normal-{n}.png", PAEDIATRIC_NORMALS)]
    assert chosen == list(range(63, 1404))
    usage = (Path(__file__).resolve().parents[1] / "docs" / "usage.md").read_text(encoding="utf-8")
    assert f"`@paediatric-normals`, stands for `{','.join(PAEDIATRIC_NORMALS)}`" in usage  # the docs give the same patterns


def test_a_named_exclude_set_expands_and_an_unknown_one_is_an_error():
    from cxrexp.data.discovery import PAEDIATRIC_NORMALS, expand_exclude
    from cxrexp.errors import DatasetError

    assert expand_exclude(["*_0.png", "@paediatric-normals"]) == ("*_0.png", *PAEDIATRIC_NORMALS)
    with pytest.raises(DatasetError, match="'@pediatric' is not a known set; known: @paediatric-normals"):
        expand_exclude(["@pediatric"])
