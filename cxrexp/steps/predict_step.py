"""The ``predict`` command: score a folder of X-ray files with a raw-image model, to CSV.

The model is the served one (``mlflow.pyfunc.load_model``), loaded once, so batch scores equal the
REST answers for the same files. Every file under the folder (recursively, hidden files included) is
offered to the model: PNG and JPEG are scored; anything else, and damaged images, are skipped with
the model's reason (``not an image``, ``truncated or corrupt``, ``too small: 20x20 px ...``).

Outputs (never written into the input folder; a default output lands in the working directory):

``<output>``                   ``file`` (path relative to the folder, POSIX), ``probability``
                               (float in [0, 1]), ``label``, ``lung_crop`` (bool: the image was
                               cropped to its lungs); sorted by ``file``.
``<stem>.skipped.csv``         ``file``, ``reason`` beside it (``predictions.csv`` ->
                               ``predictions.skipped.csv``); always written, header only when
                               nothing was skipped, so a stale list never survives a re-run.

Exit code 0 when at least one file was scored; 1 when none could be; ``ModelNotFound`` (exit 2
through the CLI) for a URI that resolves to no raw-image model.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cxrexp.config import PredictConfig
from cxrexp.errors import ConfigError, ModelNotFound

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_NOTHING_SCORED = 1
# Read before decoding: a file above this is skipped unread (the served model's own default limit).
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_REPORTED = 20
_ROW_REASON = re.compile(r"row 0: (.+)$", re.DOTALL)


@dataclass(frozen=True)
class PredictResult:
    """``scored``: DataFrame(file, probability, label, lung_crop); ``skipped``: DataFrame(file, reason)."""

    scored: pd.DataFrame
    skipped: pd.DataFrame
    output: Path
    skipped_output: Path


def skipped_path(output: Path) -> Path:
    """``predictions.csv`` -> ``predictions.skipped.csv`` (``out`` -> ``out.skipped.csv``)."""
    stem = output.name[: -len(".csv")] if output.name.lower().endswith(".csv") else output.name
    return output.with_name(f"{stem}.skipped.csv")


def list_files(folder: Path, exclude: set[Path] = frozenset()) -> list[Path]:
    """Every regular file under ``folder`` (recursively, symlinked files included), sorted."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.resolve() not in exclude]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def load_model(model_uri: str):
    """The pyfunc model at ``model_uri``; ``ModelNotFound`` when it is none, or not a raw-image model."""
    from cxrexp.mlflow_edge import serving

    model = serving.load_pyfunc(model_uri)
    signature = model.metadata.signature
    schema = signature.inputs if signature is not None else None
    inputs = schema.input_names() if schema is not None else []
    # The bare Keras model also names its tensor input "image": only a column schema takes files.
    if schema is None or schema.is_tensor_spec() or serving.INPUT_COLUMN not in inputs:
        raise ModelNotFound(
            f"{model_uri!r} takes {'tensors' if schema is not None and schema.is_tensor_spec() else 'inputs'} "
            f"{inputs or '(unknown schema)'}, not an {serving.INPUT_COLUMN!r} column of image files: pass a cxrexp raw-image model (the `model` of a train run, or a "
            "registered version), not the bare Keras model"
        )
    return model


def _rejection_reason(exc: Exception) -> str:
    """The model's reason for a one-row request (``row 0: not an image`` -> ``not an image``)."""
    message = getattr(exc, "message", None) or str(exc)
    found = _ROW_REASON.search(message)
    return (found.group(1) if found else message).strip()


def score_batch(model, files: list[Path], folder: Path) -> tuple[list[dict], list[dict]]:
    """Score ``files`` in one request; when the model rejects it, isolate the bad files one by one."""
    from mlflow.exceptions import MlflowException

    readable: list[tuple[str, bytes]] = []
    skipped: list[dict] = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                skipped.append({"file": name, "reason": f"too large: {size} bytes (maximum {MAX_FILE_BYTES})"})
                continue
            readable.append((name, path.read_bytes()))
        except OSError as exc:
            skipped.append({"file": name, "reason": f"unreadable: {exc.strerror or exc}"})
    if not readable:
        return [], skipped
    try:
        frame = model.predict(pd.DataFrame({"image": [data for _, data in readable]}))
        pairs = list(zip(readable, frame.itertuples(index=False)))
    except MlflowException:
        # The served model refuses a request with any bad row (no silent NaNs): score files singly.
        pairs = []
        for item in readable:
            try:
                single = model.predict(pd.DataFrame({"image": [item[1]]}))
                pairs.append((item, next(single.itertuples(index=False))))
            except MlflowException as exc:
                skipped.append({"file": item[0], "reason": _rejection_reason(exc)})
    scored = [{"file": name, "probability": float(row.probability), "label": str(row.label),
               "lung_crop": bool(getattr(row, "lung_crop", False))}
              for (name, _), row in pairs]
    return scored, skipped


def _write_csv_atomic(frame: pd.DataFrame, path: Path) -> None:
    """A reader never sees half a CSV: write beside the target, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        frame.to_csv(tmp_name, index=False)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _refuse_overwriting_an_image(output: Path, folder: Path) -> None:
    """``--output`` must never replace an image (an input under ``folder``, or any PNG/JPEG file):
    refused before the model is loaded or anything is written."""
    if not output.exists():
        return
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder: give a CSV file name, e.g. {output / 'predictions.csv'}")
    try:
        with open(output, "rb") as handle:
            head = handle.read(8)
    except OSError:
        head = b""
    inside = output.resolve().is_relative_to(folder.resolve())
    if head.startswith(_IMAGE_MAGIC) or (inside and output.suffix.lower() in (".png", ".jpg", ".jpeg")):
        raise ConfigError(f"--output {output} is an existing image{' under the input folder' if inside else ''}: "
                          "refusing to overwrite it with a CSV; give another file name, e.g. predictions.csv")


def predict_folder(model_uri: str, folder: str | os.PathLike[str], output: str | os.PathLike[str],
                   batch_size: int = 64, *, progress: bool = True) -> PredictResult:
    """Score every file under ``folder``; writes ``output`` and its skipped list; returns both frames."""
    from tqdm.auto import tqdm

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder: pass a folder of PNG/JPEG images")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    output_path = Path(output).expanduser()
    skipped_output = skipped_path(output_path)
    _refuse_overwriting_an_image(output_path, root)
    # An output inside the folder (allowed) must not be scored as an input on the next run.
    files = list_files(root, exclude={output_path.resolve(), skipped_output.resolve()})
    model = load_model(model_uri)
    scored: list[dict] = []
    skipped: list[dict] = []
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            batch = files[start : start + batch_size]
            batch_scored, batch_skipped = score_batch(model, batch, root)
            scored += batch_scored
            skipped += batch_skipped
            bar.update(len(batch))
    scored_frame = pd.DataFrame(scored, columns=["file", "probability", "label", "lung_crop"]).sort_values("file", kind="stable")
    skipped_frame = pd.DataFrame(skipped, columns=["file", "reason"]).sort_values("file", kind="stable")
    if len(scored_frame):
        _write_csv_atomic(scored_frame, output_path)
    _write_csv_atomic(skipped_frame, skipped_output)
    return PredictResult(scored_frame.reset_index(drop=True), skipped_frame.reset_index(drop=True),
                         output_path, skipped_output)


def run(cfg: PredictConfig) -> int:
    """The ``cxrexp predict`` command; returns the exit code."""
    folder = cfg.folder
    result = predict_folder(cfg.model, cfg.folder, cfg.output, cfg.batch_size)
    n_scored, n_skipped = len(result.scored), len(result.skipped)
    for row in result.skipped.head(MAX_REPORTED).itertuples(index=False):
        print(f"skipped {row.file}: {row.reason}", file=sys.stderr)
    if n_skipped > MAX_REPORTED:
        print(f"... and {n_skipped - MAX_REPORTED} more skipped (see {result.skipped_output})", file=sys.stderr)
    if n_scored == 0:
        what = "no files found" if n_skipped == 0 else f"all {n_skipped} file(s) were skipped"
        print(f"cxrexp predict: nothing scored in {folder}: {what}", file=sys.stderr)
        return EXIT_NOTHING_SCORED
    counts = result.scored["label"].value_counts().sort_index()
    print(
        f"scored {n_scored} of {n_scored + n_skipped} file(s) -> {result.output} "
        f"({', '.join(f'{label}: {count}' for label, count in counts.items())}); "
        f"{n_skipped} skipped -> {result.skipped_output}"
    )
    return EXIT_OK
