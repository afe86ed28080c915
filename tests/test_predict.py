"""``cxrexp predict``: a folder of files -> CSV, bad files skipped and reported, the input untouched."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest

from cxrexp.cli import main as cli_main
from cxrexp.config import ImageSpec, PredictConfig
from cxrexp.images.synthetic import SyntheticSpec, make_image
from cxrexp.learn.model import build_cnn
from cxrexp.mlflow_edge.serving import ModelNotFound, log_raw_image_model
from cxrexp.steps import predict_step

from .conftest import temp_mlflow_store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CXR_MINI = PROJECT_ROOT.parent / "shared" / "data" / "cxr-mini"
SPEC = ImageSpec(image_size=48, tile_grid=4, lungs="none")


def _encode(ext: str, image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(ext, image)
    assert ok, ext
    return encoded.tobytes()


def _synthetic(index: int, size: int = 80) -> np.ndarray:
    return make_image(SyntheticSpec(count=8, size=size, prevalence=0.5), index).image


GOOD_FILES = {
    "a.png": _encode(".png", _synthetic(0)),
    "b.jpg": _encode(".jpg", _synthetic(1)),
    "deep/c.PNG": _encode(".png", (_synthetic(2).astype(np.uint16) * 257)),  # 16-bit, upper-case suffix
    "deep/deeper/d.jpeg": _encode(".jpg", cv2.cvtColor(_synthetic(3), cv2.COLOR_GRAY2BGR)),
    "e_no_suffix": _encode(".png", _synthetic(4)),  # content decides, not the name
}
BAD_FILES = {
    "notes.txt": (b"radiologist notes, not an image", "not an image"),
    "empty.png": (b"", "empty file"),
    "deep/truncated.png": (_encode(".png", _synthetic(5))[:60], "truncated or corrupt"),
    "tiny.png": (_encode(".png", np.full((20, 20), 128, np.uint8)), "too small"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict-model")
    with temp_mlflow_store(root):
        with mlflow.start_run() as run:
            info = log_raw_image_model(build_cnn(SPEC.image_size, (8, 16), (8,), 0.0, seed=5), SPEC, 0.5)
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)
        yield {"uri": info.model_uri, "run_id": run.info.run_id, "pyfunc": pyfunc}


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.fixture()
def images(tmp_path) -> Path:
    folder = tmp_path / "xrays"
    _write(folder, GOOD_FILES)
    _write(folder, {name: data for name, (data, _) in BAD_FILES.items()})
    return folder


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_scores_good_files_and_reports_bad_ones(model, images, tmp_path, batch_size, capsys):
    before = _snapshot(images)
    output = tmp_path / "out" / "scores.csv"
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(images), output=str(output), batch_size=batch_size)) == 0
    assert _snapshot(images) == before  # nothing written into the input folder

    scored = pd.read_csv(output)
    assert list(scored.columns) == ["file", "probability", "label", "lung_crop"]
    assert scored["file"].tolist() == sorted(GOOD_FILES)
    expected = model["pyfunc"].predict(pd.DataFrame({"image": [GOOD_FILES[f] for f in sorted(GOOD_FILES)]}))
    np.testing.assert_allclose(scored["probability"], expected["probability"], atol=1e-6)
    assert scored["label"].tolist() == expected["label"].tolist()
    assert scored["probability"].between(0, 1).all()

    skipped = pd.read_csv(tmp_path / "out" / "scores.skipped.csv")
    assert list(skipped.columns) == ["file", "reason"]
    assert skipped["file"].tolist() == sorted(BAD_FILES)
    for row in skipped.itertuples():
        assert BAD_FILES[row.file][1] in row.reason
    err = capsys.readouterr()
    assert "skipped notes.txt: not an image" in err.err
    assert "scored 5 of 9 file(s)" in err.out


@pytest.mark.parametrize(
    "uri_kind, words",
    [
        ("missing alias", "no model at 'models:/nope@champion'"),
        ("missing run", "no model at 'runs:/0123456789abcdef0123456789abcdef/model'"),
        ("bare keras", "not an 'image' column of image files"),
    ],
)
def test_wrong_model_is_model_not_found_and_exit_2(model, images, tmp_path, uri_kind, words, capsys):
    uri = {
        "missing alias": "models:/nope@champion",
        "missing run": "runs:/0123456789abcdef0123456789abcdef/model",
        "bare keras": f"runs:/{model['run_id']}/keras_model",
    }[uri_kind]
    with pytest.raises(ModelNotFound, match=words.replace("(", r"\(")):
        predict_step.load_model(uri)
    output = tmp_path / "never.csv"
    assert cli_main(["predict", "--model", uri, str(images), "--output", str(output)]) == 2
    assert words in capsys.readouterr().err
    assert not output.exists()


def test_nothing_scorable_exits_1_without_predictions(model, tmp_path, capsys):
    folder = tmp_path / "junk"
    _write(folder, {name: data for name, (data, _) in BAD_FILES.items()})
    output = tmp_path / "p.csv"
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(folder), output=str(output), batch_size=8)) == 1
    assert not output.exists()
    assert len(pd.read_csv(tmp_path / "p.skipped.csv")) == len(BAD_FILES)
    assert "all 4 file(s) were skipped" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(empty), output=str(tmp_path / "q.csv"), batch_size=8)) == 1
    assert "no files found" in capsys.readouterr().err


def test_missing_folder_is_exit_2(model, tmp_path, capsys):
    assert cli_main(["predict", "--model", model["uri"], str(tmp_path / "absent")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_default_output_goes_to_the_working_directory(model, images, tmp_path, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    before = _snapshot(images)
    assert cli_main(["predict", "--model", model["uri"], str(images), "--batch-size", "3"]) == 0
    assert sorted(p.name for p in workdir.iterdir()) == ["predictions.csv", "predictions.skipped.csv"]
    assert _snapshot(images) == before


def test_an_output_inside_the_folder_is_not_scored_on_the_next_run(model, images):
    output = images / "predictions.csv"
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(images), output=str(output), batch_size=16)) == 0
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(images), output=str(output), batch_size=16)) == 0
    assert len(pd.read_csv(output)) == len(GOOD_FILES)
    assert "predictions.skipped.csv" not in pd.read_csv(images / "predictions.skipped.csv")["file"].tolist()


@pytest.mark.parametrize(
    "name, expected",
    [("predictions.csv", "predictions.skipped.csv"), ("out/x.CSV", "out/x.skipped.csv"), ("scores", "scores.skipped.csv")],
)
def test_skipped_path(name, expected):
    assert predict_step.skipped_path(Path(name)) == Path(expected)


def test_real_cxr_mini_images(model, tmp_path):
    covid = CXR_MINI / "COVID" / "images"
    normal = CXR_MINI / "Normal" / "images"
    if not covid.is_dir():
        pytest.skip(f"real data not found at {CXR_MINI} (the shared cxr-mini set sits beside the project)")
    folder = tmp_path / "links"
    folder.mkdir()
    picked = sorted(covid.glob("*.png"))[:3] + sorted(normal.glob("*.png"))[:3]
    for path in picked:  # links, never copies, and never a write into the shared set
        os.symlink(path, folder / path.name)
    output = tmp_path / "real.csv"
    assert predict_step.run(PredictConfig(model=model["uri"], folder=str(folder), output=str(output), batch_size=4)) == 0
    scored = pd.read_csv(output)
    assert sorted(scored["file"]) == sorted(p.name for p in picked)
    expected = model["pyfunc"].predict(pd.DataFrame({"image": [p.read_bytes() for p in sorted(picked, key=lambda p: p.name)]}))
    np.testing.assert_allclose(scored["probability"], expected["probability"], atol=1e-6)


@pytest.mark.parametrize(
    "name, target",
    [
        ("one of its input images", lambda folder, tmp: next(p for p in sorted(folder.rglob("*.png")))),
        ("a PNG elsewhere, whatever its name", lambda folder, tmp: _png_named(tmp / "scores.csv")),
        ("a folder", lambda folder, tmp: tmp),
    ],
)
def test_output_never_overwrites_an_image(model, images, tmp_path, name, target, capsys):
    output = target(images, tmp_path)
    before = _snapshot(images)
    kept = output.read_bytes() if output.is_file() else None
    assert cli_main(["predict", "--model", model["uri"], str(images), "--output", str(output)]) == 2, name
    assert "--output" in capsys.readouterr().err
    assert _snapshot(images) == before, name
    if kept is not None:
        assert output.read_bytes() == kept, name


def _png_named(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return path
