"""Preprocess orchestration: discover -> decode/enhance in parallel -> group duplicates -> split -> store.

No MLflow here: the preprocess run (``cxrexp/mlflow_edge/preprocess_run.py``) logs what this returns.
Work is streamed: worker processes decode one image at a time and write it straight to its row of
the ``.npy`` files (``store.RowWriter``), sending the parent only hashes and sizes, so peak memory
does not grow with the number of images (benchmarks/bench_preprocess.py measures it).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrexp.config import ImageSpec, PreprocessConfig
from cxrexp.data import discovery, files
from cxrexp.data import split as splitting
from cxrexp.data.store import (
    DatasetWriter,
    PreparedDataError,
    PreparedDataset,
    RowWriter,
    open_prepared,
    stable_hash,
)
from cxrexp.errors import DatasetError, WorkerDied
from cxrexp.images import decode, hashing, synthetic
from cxrexp.lungs import fallbacks
from cxrexp.lungs import view as lung_view
from cxrexp.lungs.masks import dice

# The segmenter's forward pass: uint8 grey images (any sizes) -> bool lung masks, each at its image's
# size (``lungs.segmenter.predict_masks`` bound to a model; the MLflow edge loads it).
LungMasks = Callable[[list[np.ndarray]], list[np.ndarray]]
# Images per segmenter call: a batch amortises the forward pass; 32 working images are ~2 MiB.
SEGMENT_BATCH = 32


class BackgroundLungMasks:
    """A segmenter loaded in a thread of its own while the workers decode; the first call waits for it.

    Why: loading it (TensorFlow's import, then the model) took 7 s of a 21 s cxr-mini preprocess with
    the workers idle, and once TensorFlow is in the parent the workers must be spawned (seconds of
    imports each) instead of forked. ``run_preprocess`` starts the load once its workers exist, so
    they are forked before TensorFlow's threads do. A load that fails raises at the first call.
    """

    def __init__(self, load: Callable[[], LungMasks]):
        self._load = load
        self._thread: threading.Thread | None = None
        self._masks: LungMasks | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cxrexp-segmenter-load", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._masks = self._load()
        except BaseException as err:  # noqa: BLE001 (raised in the caller's thread at the first call)
            self._error = err

    def __call__(self, images: list[np.ndarray]) -> list[np.ndarray]:
        self.start()
        assert self._thread is not None
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._masks is not None
        return self._masks(images)

log = logging.getLogger(__name__)

SYNTHETIC_CLASSES = ("COVID", "Normal")


@dataclass(frozen=True)
class PreprocessResult:
    dataset: PreparedDataset
    reused: bool
    seconds: float

    @property
    def skipped(self) -> pd.DataFrame:
        return self.dataset.skipped()


@dataclass(frozen=True)
class _Task:
    """One unit of work for a worker: a file (and its mask) or a synthetic image index."""

    row: int
    path: str = ""
    mask_path: str | None = None
    synthetic_index: int = -1


@dataclass(frozen=True)
class _Stored:
    """What a worker sends back for an image it has written to its row: hashes and sizes, no pixels."""

    sha256: str
    phash: int
    width: int
    height: int
    has_mask: bool
    mask_problem: str | None


@dataclass(frozen=True)
class _Pending:
    """An image waiting for the segmenter (lung views only): the working image and its dataset mask."""

    row: int
    working: np.ndarray
    dataset_mask: np.ndarray | None


# Set once per worker process by _init_worker (spawned workers do not share the parent's globals).
_WORKER: dict[str, Any] = {}


def _configure(spec: ImageSpec, max_pixels: int, synthetic_spec: synthetic.SyntheticSpec | None,
               rows: RowWriter) -> None:
    _WORKER.update(spec=spec, max_pixels=max_pixels, synthetic_spec=synthetic_spec, rows=rows)


def _init_worker(spec: ImageSpec, max_pixels: int, synthetic_spec: synthetic.SyntheticSpec | None,
                 rows: RowWriter) -> None:
    # One OpenCV thread per worker: the pool already uses every core. (Under fork the parent has set
    # 1 before forking, see _opencv_threads, so this call finds nothing to reconfigure.)
    import cv2

    cv2.setNumThreads(1)
    _configure(spec, max_pixels, synthetic_spec, rows)


def _process(task: _Task) -> tuple[int, _Stored | None, str, _Pending | None]:
    """Worker body: prepare one image and write it to its row; (row, what was stored or None, reason
    skipped, None). With a lung view the worker cannot finish the image (the segmenter lives in the
    parent), so it writes nothing and returns the working image as a ``_Pending`` instead."""
    spec: ImageSpec = _WORKER["spec"]
    try:
        if task.synthetic_index >= 0:
            item = _process_synthetic(task.synthetic_index)
        else:
            item = files.process_file(task.path, task.mask_path, spec, _WORKER["max_pixels"])
    except decode.ImageRejected as err:
        return task.row, None, err.reason, None
    except Exception as err:  # noqa: BLE001 - one bad file must never end the run
        return task.row, None, f"unexpected error: {type(err).__name__}: {err}", None
    pending = None
    if spec.lungs != "none":
        pending = _Pending(task.row, item.image, item.mask)
    else:
        # Outside the try: a failed write (disk full) must end the run, not skip every remaining image.
        _WORKER["rows"].write(task.row, item.image, item.mask)
    return task.row, _Stored(
        sha256=item.sha256,
        phash=int(item.phash),
        width=int(item.width),
        height=int(item.height),
        has_mask=item.mask is not None,
        mask_problem=getattr(item, "mask_problem", None),  # not part of the ProcessedImage contract
    ), "", pending


def _process_synthetic(index: int) -> files.ProcessedImage:
    import hashlib

    spec: ImageSpec = _WORKER["spec"]
    item = synthetic.make_image(_WORKER["synthetic_spec"], index)
    image, mask = files.prepare_pair(item.image, item.mask, spec)
    return files.ProcessedImage(
        image=image,
        mask=mask,
        sha256=hashlib.sha256(item.image.tobytes()).hexdigest(),
        phash=hashing.perceptual_hash(item.image),
        width=item.image.shape[1],
        height=item.image.shape[0],
    )


def _stat(path: str | None) -> tuple[int, int, int, int]:
    """(size, mtime, ctime, inode). The change time is in because bytes can change while size and
    mtime stay (an edit followed by ``touch -d``, a tool that restores timestamps): only the kernel
    sets ctime, on every write, so it is what catches that; a replaced file also has a new inode."""
    if not path:
        return (0, 0, 0, 0)
    try:
        st = os.stat(path)
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    except OSError:
        return (-1, -1, -1, -1)


def _file_fingerprint(records: list[discovery.ImageRecord]) -> list[tuple[Any, ...]]:
    """Path, size, mtime, ctime and inode of every image and mask, and the patient id: cheap to
    compute (no file is read), and it changes when a file is rewritten, replaced, a mask edited or the
    metadata spreadsheet regroups patients."""
    return [
        (rec.path, *_stat(rec.path), rec.mask_path or "", *_stat(rec.mask_path), rec.patient_id or "")
        for rec in records
    ]


def _common_params(cfg: PreprocessConfig) -> dict[str, Any]:
    return {
        "image_spec": cfg.image.key_fields(),
        "val_frac": cfg.val_frac,
        "test_frac": cfg.test_frac,
        "seed": cfg.seed,
        "near_dup_distance": cfg.near_dup_distance,
        "max_pixels": cfg.max_pixels,
    }


@dataclass(frozen=True)
class _Plan:
    """What a preprocess run will do: one task per row, the per-row input table (source as it can be
    written, class, label, patient), params, the cache key, the synthetic spec (or None), and the
    listed entries that cannot be images (path, reason) and the files ``exclude`` left out, both
    reported as skipped."""

    tasks: list[_Task]
    inputs: pd.DataFrame
    params: dict[str, Any]
    key: str
    synthetic: synthetic.SyntheticSpec | None
    unusable: list[tuple[str, str]]
    excluded: list[tuple[str, str]] = field(default_factory=list)


def _plan(cfg: PreprocessConfig) -> _Plan:
    params = _common_params(cfg)
    if not cfg.data_dir:
        syn = synthetic.SyntheticSpec(
            count=cfg.synthetic_count,
            prevalence=cfg.synthetic_prevalence,
            size=cfg.synthetic_size,
            seed=cfg.seed,
            shortcut=cfg.synthetic_shortcut,
            faintest=cfg.synthetic_faintest,
        )
        labels = synthetic.labels_for(syn)
        names = np.where(labels == 1, SYNTHETIC_CLASSES[0], SYNTHETIC_CLASSES[1])
        inputs = pd.DataFrame(
            {
                "source": [f"synthetic://{syn.seed}/{i}" for i in range(syn.count)],
                "class_name": names,
                "label": labels.astype(np.int64),
                "patient_id": [None] * syn.count,
            }
        )
        tasks = [_Task(row=i, synthetic_index=i) for i in range(syn.count)]
        params.update(
            source="synthetic",
            classes=list(SYNTHETIC_CLASSES),
            positive_class=SYNTHETIC_CLASSES[0],
            synthetic=asdict(syn),
            layout="synthetic",
            notes=[],
        )
        key = "synthetic-" + stable_hash(params)
        return _Plan(tasks, inputs, params, key, syn, [])

    found = discovery.discover(cfg.data_dir, cfg.classes, cfg.positive_class, cfg.exclude)
    inputs = pd.DataFrame(
        {
            # A file name that is not valid UTF-8 would crash to_csv after all the decoding: the table
            # holds its escaped form, the task keeps the real path to open.
            "source": [discovery.display_name(r.path) for r in found.records],
            "class_name": [r.class_name for r in found.records],
            "label": np.array([r.label for r in found.records], dtype=np.int64),
            "patient_id": [r.patient_id for r in found.records],
        }
    )
    tasks = [_Task(row=i, path=r.path, mask_path=r.mask_path) for i, r in enumerate(found.records)]
    params.update(
        source=str(Path(cfg.data_dir).expanduser().resolve()),
        classes=list(cfg.classes),
        positive_class=cfg.positive_class,
        synthetic=None,
        layout=found.layout,
        notes=list(found.notes),
    )
    unusable = [(discovery.display_name(path), reason) for path, reason in found.unusable]
    excluded = [(discovery.display_name(path), reason) for path, reason in found.excluded]
    if cfg.exclude:  # only then: the keys of datasets prepared before exclude existed stay valid
        params["exclude"] = list(cfg.exclude)
    key = "data-" + stable_hash({**params, "files": _file_fingerprint(found.records), "unusable": unusable})
    return _Plan(tasks, inputs, params, key, None, unusable, excluded)


def _refuse_out_dir_inside_data(cfg: PreprocessConfig) -> None:
    """cxrexp never writes into a data folder: an ``out_dir`` inside ``data_dir`` (or the same folder)
    is refused before anything is listed or written. Both are resolved, so a symlink does not hide it."""
    if not cfg.data_dir:
        return
    data = Path(cfg.data_dir).expanduser().resolve()
    out = Path(cfg.out_dir).expanduser().resolve()
    if out == data or out.is_relative_to(data):
        raise DatasetError(
            f"out_dir {out} is inside the data folder {data}: cxrexp never writes into a data folder "
            "(a later run would also read its own output as images); pick an out_dir outside it, "
            "e.g. -P out_dir=.cxrexp/prepared"
        )


def prepared_key(cfg: PreprocessConfig) -> str:
    """The folder name (under ``cfg.out_dir``) of the prepared dataset ``cfg`` describes *now*.

    It covers the parameters and, for a data folder, every file's path, size, mtime, ctime and inode
    (``_stat``: a rewrite that keeps size and mtime still changes ctime), so a
    finished run whose prepared folder has another name was made from other inputs. Lists the data
    folder (no decoding); raises ``data.DatasetError`` as ``run_preprocess`` would.
    """
    return _plan(cfg).key


def _start_method() -> str:
    """fork starts workers in milliseconds; spawn costs seconds of imports per worker but is the only
    safe choice once TensorFlow (or another threaded runtime) lives in the parent: forking its threads
    can deadlock the child. OpenCV's own thread pool is made fork-safe by ``_opencv_threads``."""
    if sys.platform.startswith("linux") and "tensorflow" not in sys.modules:
        return "fork"
    return "spawn"


@contextlib.contextmanager
def _opencv_threads(count: int) -> Iterator[None]:
    """Run the block with OpenCV limited to ``count`` threads, then restore the caller's setting.

    Why around a fork: once the parent has used OpenCV's thread pool (any cv2.resize or CLAHE on a
    large image, e.g. a test that drew its images with OpenCV), a forked child inherits the pool's
    bookkeeping but not its threads, and its first cv2.setNumThreads waits for them forever. With
    the parent at one thread when it forks, the children have no pool to wait for.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


def _chunksize(n_tasks: int, workers: int) -> int:
    # Small chunks: the last chunk of a slow worker is the wall-clock tail; IPC per chunk is cheap.
    return max(1, min(16, n_tasks // (workers * 8)))


def _process_chunk(tasks: list[_Task]) -> list[tuple[int, _Stored | None, str, _Pending | None]]:
    return [_process(task) for task in tasks]


def _in_any_order(pool: ProcessPoolExecutor, tasks: list[_Task], chunksize: int) -> Iterator[tuple]:
    """Worker results as chunks finish. A worker that dies abruptly (the kernel's OOM killer, a
    SIGKILL) breaks the pool, and every unfinished chunk then raises BrokenProcessPool at once: that
    is why this is a ProcessPoolExecutor and not multiprocessing.Pool, whose imap_unordered waits
    forever for the lost chunk. It becomes a WorkerDied that names what was in flight.

    Every chunk is submitted before this returns (not at the first ``next``), so the workers exist
    by then: a forking pool forks them all at the first submit.
    """
    chunks = [tasks[i : i + chunksize] for i in range(0, len(tasks), chunksize)]
    futures = {pool.submit(_process_chunk, chunk): chunk for chunk in chunks}
    return _results(futures, len(tasks))


def _results(futures: dict, n_tasks: int) -> Iterator[tuple]:
    finished = 0
    for future in as_completed(futures):
        try:
            results = future.result()
        except BrokenProcessPool:
            lost = [task for f, chunk in futures.items() if not (f.done() and f.exception() is None) for task in chunk]
            raise WorkerDied(
                f"a preprocess worker process died abruptly (killed by the system, most often for lack of "
                f"memory, or by a signal) after {finished} of {n_tasks} images; {len(lost)} were not "
                f"finished, the first of them {lost[0].path or lost[0].synthetic_index!r}. Nothing was kept. "
                "Try fewer workers (-P workers=1), a smaller -P max_pixels, or more memory"
            ) from None
        finished += len(results)
        yield from results


@contextlib.contextmanager
def _processed(tasks: list[_Task], workers: int, init_args: tuple) -> Iterator[Iterator[tuple[int, _Stored | None, str]]]:
    """Yields an iterator of worker results ``(row, _Stored | None, reason)`` in any order; each
    stored image is already in its row of the dataset being written.

    The pool is started when the block is entered, before the caller starts threads of its own (a
    progress bar's monitor). Leaving the block cancels what has not started; chunks already running
    (at most one per worker, ``_chunksize`` images) finish first.
    """
    if workers <= 1:
        _configure(*init_args)  # in-process: OpenCV keeps its own threads for this one image at a time
        try:
            yield map(_process, tasks)
        finally:
            _WORKER.clear()  # the row writer points into a folder that is about to be renamed
        return
    method = _start_method()
    ctx = multiprocessing.get_context(method)
    guard = _opencv_threads(1) if method == "fork" else contextlib.nullcontext()
    with guard:
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args)
        try:
            yield _in_any_order(pool, tasks, _chunksize(len(tasks), workers))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def run_preprocess(cfg: PreprocessConfig, *, progress: bool = True, lung_masks: LungMasks | None = None) -> PreprocessResult:
    """Prepare the dataset described by ``cfg`` (or reuse the identical prepared one).

    ``lung_masks`` (required when ``cfg.image.lungs`` is not ``none``) is the segmenter of
    ``cfg.image.lung_model``: every image is cropped with its mask, never with a dataset mask, so the
    served model, which only has the segmenter, sees what training saw. Dataset masks, where present,
    are scored against it (``seg_dice`` in the manifest) and stored for the audit.

    Raises ``data.DatasetError`` for a missing folder or unknown class and ``PreparedDataError`` when a
    class is left with no usable image; in both cases nothing is left on disk that looks valid.

    Long: the streaming loop owns the worker pool, the row writer and the skip list at once; split into pieces they would have to pass all three around.
    """
    started = time.perf_counter()
    spec = cfg.image
    if spec.lungs != "none" and lung_masks is None:
        raise ValueError(f"lungs={spec.lungs} needs the segmenter's lung_masks function")
    _refuse_out_dir_inside_data(cfg)
    plan = _plan(cfg)
    tasks, inputs, params, key, syn = plan.tasks, plan.inputs, plan.params, plan.key, plan.synthetic
    final = Path(cfg.out_dir).expanduser().resolve() / key
    if (final / "COMPLETE").is_file():
        try:
            return PreprocessResult(open_prepared(final), reused=True, seconds=time.perf_counter() - started)
        except PreparedDataError as err:
            log.warning("cached prepared dataset unusable, rebuilding: %s", err)

    workers = cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)
    workers = min(workers, max(1, len(tasks)))
    n = len(tasks)
    sha = [""] * n
    phash = [0] * n  # python ints: 256-bit perceptual hashes
    ok = np.zeros(n, dtype=bool)
    has_mask = np.zeros(n, dtype=bool)
    width = np.zeros(n, dtype=np.int64)
    height = np.zeros(n, dtype=np.int64)
    lungs = _LungColumns(n)
    skipped: list[tuple[str, str]] = list(plan.unusable) + list(plan.excluded)
    for path, reason in plan.unusable:
        log.warning("skipped %s: %s", path, reason)
    if plan.excluded:  # asked for: one line, not one per file
        log.info("%d files excluded by -P exclude=%s (listed in skipped.csv)", len(plan.excluded), ",".join(cfg.exclude))

    with DatasetWriter(cfg.out_dir, key, n, spec.image_size) as writer:
        pending: list[_Pending] = []

        def flush() -> None:
            _finish_lung_views(pending, lung_masks, spec, writer, lungs, inputs)
            pending.clear()

        with _processed(tasks, workers, (spec, cfg.max_pixels, syn, writer.rows)) as results, \
                tqdm(total=n, desc="preprocess", unit="img", disable=not progress, file=sys.stderr) as bar:
            if isinstance(lung_masks, BackgroundLungMasks):
                lung_masks.start()  # the workers exist now: TensorFlow may start its threads
            for row, item, reason, waiting in results:
                bar.update(1)
                if item is None:
                    source = inputs.at[row, "source"]
                    skipped.append((source, reason))
                    log.warning("skipped %s: %s", source, reason)
                    continue
                if item.mask_problem:
                    log.warning("mask of %s unusable (%s): stored without a mask", inputs.at[row, "source"],
                                item.mask_problem)
                ok[row] = True
                sha[row] = item.sha256
                phash[row] = item.phash
                has_mask[row] = item.has_mask
                width[row], height[row] = item.width, item.height
                if waiting is not None:
                    pending.append(waiting)
                    if len(pending) >= SEGMENT_BATCH:
                        flush()
            flush()

        for row, reason in splitting.cross_class_duplicates(
                [sha[i] if ok[i] else "" for i in range(n)], inputs["class_name"].tolist(),
                inputs["source"].tolist()).items():
            ok[row] = False
            skipped.append((inputs.at[row, "source"], reason))
            log.warning("skipped %s: %s", inputs.at[row, "source"], reason)
        kept = np.flatnonzero(ok)
        labels = inputs["label"].to_numpy()[kept]
        _check_classes(inputs, kept, params["classes"], skipped)
        dup = splitting.duplicate_groups(
            [sha[i] for i in kept],
            [phash[i] for i in kept],
            # Synthetic images are distinct by construction, and all share one anatomy template that a
            # perceptual hash cannot tell apart: only exact copies would be duplicates there.
            -1 if syn is not None else cfg.near_dup_distance,
        )
        patients = inputs["patient_id"].to_numpy()[kept]
        groups = splitting.merge_groups(dup, list(patients))
        split = splitting.stratified_group_split(labels, groups, cfg.val_frac, cfg.test_frac, cfg.seed)
        manifest = pd.DataFrame(
            {
                "row": kept.astype(np.int64),
                "source": inputs["source"].to_numpy()[kept],
                "class_name": inputs["class_name"].to_numpy()[kept],
                "label": labels.astype(np.int64),
                "split": split,
                "sha256": [sha[i] for i in kept],
                "phash": [format(phash[i], f"0{hashing.PHASH_BITS // 4}x") for i in kept],
                "dup_group": dup,
                "group": groups,
                "patient_id": [p if p is not None else "" for p in patients],
                "has_mask": has_mask[kept] | lungs.segmented[kept],
                "width": width[kept],
                "height": height[kept],
            }
        )
        if spec.lungs != "none":
            manifest = manifest.assign(**lungs.columns(kept, has_mask))
            params["lung_fallbacks"] = fallbacks.count_by_class(manifest["class_name"], ~manifest["lung_crop"])
            params["lung_fallback_warning"] = fallbacks.differing_rates_warning(
                manifest["class_name"], ~manifest["lung_crop"])
            if params["lung_fallback_warning"]:
                log.warning("%s", params["lung_fallback_warning"])
        params["n_duplicate_groups"] = splitting.count_duplicate_groups(dup)
        params["cache_key"] = key
        skipped_frame = pd.DataFrame(skipped, columns=["path", "reason"]).sort_values("path", kind="stable")
        dataset = writer.finish(manifest, params, skipped_frame)
    return PreprocessResult(dataset, reused=False, seconds=time.perf_counter() - started)


class _LungColumns:
    """Per-row lung-view results while rows arrive in any order (lung views only)."""

    def __init__(self, n: int) -> None:
        self.segmented = np.zeros(n, dtype=bool)  # a mask (dataset's or segmenter's) was stored
        self.applied = np.zeros(n, dtype=bool)
        self.area = np.full(n, np.nan)
        self.reason = [""] * n
        self.dice = np.full(n, np.nan)

    def columns(self, kept: np.ndarray, dataset_mask: np.ndarray) -> dict[str, Any]:
        """The manifest's lung columns for the ``kept`` rows (see docs/lungs.md)."""
        return {
            "lung_crop": self.applied[kept],
            "lung_area": self.area[kept],
            "lung_fallback_reason": [self.reason[i] for i in kept],
            "mask_source": np.where(dataset_mask[kept], "dataset", "segmenter"),
            "seg_dice": self.dice[kept],
        }


def _finish_lung_views(pending: list[_Pending], lung_masks: LungMasks | None, spec: ImageSpec,
                       writer: DatasetWriter, lungs: _LungColumns, inputs: pd.DataFrame) -> None:
    """Segment a batch of working images, cut each one's lung view, write its row.

    The stored mask is the dataset's where it has one (cut with the same box), else the segmenter's:
    either way it lines up with the stored image, for the audit.
    """
    if not pending:
        return
    predicted = lung_masks([item.working for item in pending])
    for item, mask in zip(pending, predicted):
        image, view = lung_view.finish(item.working, mask, spec)
        truth = item.dataset_mask.astype(bool) if item.dataset_mask is not None else None
        writer.write(item.row, image, lung_view.view_mask(truth if truth is not None else mask, view, spec))
        lungs.segmented[item.row] = True
        lungs.applied[item.row] = view.applied
        lungs.area[item.row] = view.area
        lungs.reason[item.row] = view.reason
        if truth is not None:
            lungs.dice[item.row] = dice(mask, truth)
        if not view.applied:
            log.warning("lung crop not applied to %s (%s): the whole image is used",
                        inputs.at[item.row, "source"], view.reason)


def _check_classes(inputs: pd.DataFrame, kept: np.ndarray, classes: list[str], skipped: list[tuple[str, str]]) -> None:
    usable = set(inputs["class_name"].to_numpy()[kept])
    empty = [c for c in classes if c not in usable]
    if empty:
        sample = "; ".join(f"{Path(p).name}: {r}" for p, r in skipped[:5])
        raise PreparedDataError(
            f"class(es) {empty} have no usable image after skipping {len(skipped)} file(s)"
            + (f" (e.g. {sample})" if sample else "")
            + ": fix or replace the files, or leave the class out with -P classes=..."
        )
