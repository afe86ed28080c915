"""Group exact and near-duplicate images (and patients) and split them without leakage (pure)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cxrexp.data.discovery import clean_id

SPLITS = ("train", "val", "test")
_UINT64_MASK = (1 << 64) - 1

# --------------------------------------------------------------------------------------------------
# Duplicate groups
# --------------------------------------------------------------------------------------------------


def _as_words(values: Any) -> np.ndarray:
    """Perceptual hashes as uint64 words, shape (N, W): a 256-bit hash is 4 words, a 64-bit one 1.

    Accepts a (N, W) unsigned array, a 1-D int array (int64 read as the same 64 bits) or a sequence
    of Python ints of any width (split into big-endian 64-bit words).
    """
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        if values.ndim == 2:
            return values.astype(np.uint64)
        words = values.astype(np.int64).view(np.uint64) if values.dtype.kind == "i" else values.astype(np.uint64)
        return words.reshape(-1, 1)
    # Not np.asarray: a list holding ints >= 2**63 silently becomes float64 and loses bits.
    ints = [int(v) for v in values]
    width = max([1] + [(v.bit_length() + 63) // 64 for v in ints])
    out = np.zeros((len(ints), width), dtype=np.uint64)
    for i, v in enumerate(ints):
        for w in range(width):
            out[i, width - 1 - w] = (v >> (64 * w)) & _UINT64_MASK
    return out


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected-component label per node of an undirected graph with edges u[k]-v[k]."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


def _first_appearance_ids(labels: np.ndarray) -> np.ndarray:
    """Relabel so ids are 0..G-1 in the order each group first appears."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


# Cells of one block's distance matrix (float32: 64 MB): bounds memory whatever N is.
_BLOCK_CELLS = 16_000_000


def comparison_blocks(m: int) -> list[tuple[int, int]]:
    """Row blocks ``[start, stop)`` of the upper-triangular distance matrix of ``m`` distinct hashes.

    Block ``[start, stop)`` compares its rows with hashes ``start..m-1`` only, so each unordered pair
    is computed once (plus the block's own lower triangle, masked out).
    """
    block = max(1, _BLOCK_CELLS // max(m, 1))
    return [(start, min(m, start + block)) for start in range(0, m, block)]


def comparisons(m: int) -> int:
    """Distance cells ``duplicate_groups`` computes for ``m`` distinct hashes (its cost model)."""
    return sum((stop - start) * (m - start) for start, stop in comparison_blocks(m))


def cross_class_duplicates(sha256: Sequence[str], class_names: Sequence[str], sources: Sequence[str]) -> dict[int, str]:
    """{index: reason} for every image whose bytes also appear in another class ("" = no hash, not
    compared). The same file filed under two classes has no true label, and keeping either copy
    teaches the model a label that is wrong for the other, so both are excluded and reported."""
    by_hash: dict[str, list[int]] = {}
    for index, digest in enumerate(sha256):
        if digest:
            by_hash.setdefault(digest, []).append(index)
    excluded: dict[int, str] = {}
    for indices in by_hash.values():
        if len({class_names[i] for i in indices}) < 2:
            continue
        for i in indices:
            others = [j for j in indices if class_names[j] != class_names[i]]
            excluded[i] = (f"same bytes as {sources[others[0]]} in class {class_names[others[0]]}"
                           + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
                           + ": its label is ambiguous, excluded from both classes")
    return excluded


def duplicate_groups(sha256: Sequence[str], phash: Any, max_distance: int) -> np.ndarray:
    """Group id per image: int64[N], ids 0..G-1 in order of first appearance.

    Two images share a group when their sha256 strings are equal or their perceptual hashes (64 or
    256 bits) differ in at most ``max_distance`` bits; groups are transitive (a~b and b~c puts a, b, c together,
    even if a and c are far apart). ``max_distance < 0`` switches the perceptual test off.
    ``phash``: uint64 (N, W) words, uint64[N]/int64[N] (one word) or a sequence of Python ints.

    Cost: each unordered pair of *distinct* hashes once (``comparisons``), as blocked matrix products
    (timed in benchmarks/bench_duplicates.py).
    """
    n = len(sha256)
    hashes = _as_words(phash)
    if len(hashes) != n:
        raise ValueError(f"sha256 has {n} entries but phash has {len(hashes)}; give one of each per image")
    rows = np.arange(n, dtype=np.int64)
    sha_strings = np.asarray(sha256, dtype=object).astype(str)
    _, sha_first, sha_inverse = np.unique(sha_strings, return_index=True, return_inverse=True)
    u, v = [rows], [sha_first[sha_inverse.reshape(-1)]]
    if max_distance >= 0 and n:
        unique_hashes, hash_first, hash_inverse = np.unique(hashes, axis=0, return_index=True, return_inverse=True)
        u.append(rows)
        v.append(hash_first[hash_inverse.reshape(-1)])
        m = len(unique_hashes)
        # Hamming distance as a matrix product: with bits as +-1, a.b = n_bits - 2 * hamming(a, b).
        # One BLAS call per block instead of a popcount over an (rows, m, words) array: ~30x faster.
        signs = 1.0 - 2.0 * np.unpackbits(unique_hashes.view(np.uint8), axis=1).astype(np.float32)
        n_bits = signs.shape[1]
        for start, stop in comparison_blocks(m):
            # Upper triangle only: each unordered pair of distinct hashes once. Exact: integers <= 256.
            distance = (n_bits - signs[start:stop] @ signs[start:].T) / 2
            close = distance <= max_distance
            close[:, : stop - start] &= np.triu(np.ones((stop - start, stop - start), dtype=bool), k=1)
            a, b = np.nonzero(close)
            if len(a):
                u.append(hash_first[start + a])
                v.append(hash_first[start + b])
    labels = _components(n, np.concatenate(u), np.concatenate(v))
    return _first_appearance_ids(labels)


def count_duplicate_groups(groups: Sequence[int] | np.ndarray) -> int:
    """Number of groups with more than one member."""
    groups = np.asarray(groups, dtype=np.int64)
    if groups.size == 0:
        return 0
    _, counts = np.unique(groups, return_counts=True)
    return int((counts > 1).sum())


def _is_missing(value: Any) -> bool:
    return clean_id(value) is None


def merge_groups(*keys: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Union of several groupings of the same N rows: int64[N], ids in order of first appearance.

    Two rows share the result's group when they share any key's value. None, NaN and "" mean "no
    key" (an image without a patient id joins nobody through that key). Values of different keys
    never match each other (patient "3" is not duplicate group 3).
    """
    if not keys:
        raise ValueError("merge_groups needs at least one grouping")
    n = len(keys[0])
    if any(len(k) != n for k in keys):
        raise ValueError(f"groupings differ in length: {[len(k) for k in keys]}; give one value per row each")
    u: list[int] = []
    v: list[int] = []
    for key in keys:
        first_row: dict[Any, int] = {}
        for row, value in enumerate(np.asarray(key, dtype=object).tolist()):
            if _is_missing(value):
                continue
            anchor = first_row.setdefault(value, row)
            if anchor != row:
                u.append(anchor)
                v.append(row)
    labels = _components(n, np.asarray(u, dtype=np.int64), np.asarray(v, dtype=np.int64))
    return _first_appearance_ids(labels)


# --------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------


def stratified_group_split(
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    val_frac: float,
    test_frac: float,
    seed: int,
) -> np.ndarray:
    """Assign each row to "train", "val" or "test"; returns a str array [N].

    Whole groups move together (no group straddles two splits). Groups are shuffled with ``seed``,
    then stably sorted by size, largest first, and each is placed greedily in the split that is least
    filled relative to its per-class target, counting the group at half its size (Webster/Sainte-Laguë
    apportionment: unbiased rounding, so split sizes land within about one group of
    ``frac * class count`` for every class, which is what keeps the positive rate of each split close
    to the overall one). Ties go to train, then val, then test.

    Small classes: a class with fewer than about ``1 / (2 * frac)`` images gets none in that split (with
    val_frac = test_frac = 0.1: 1-4 images all go to train, the 5th goes to val). Metrics of such a
    split are undefined for that class; callers should check. Fewer rows than splits likewise fill
    train first. ``labels`` may hold any values; each distinct value is stratified.

    Long mostly in this docstring: the apportionment itself is a dozen lines.
    """
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be 1-D and the same length")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    n = len(labels)
    if n == 0:
        return np.array([], dtype="<U5")
    _, class_of_row = np.unique(labels, return_inverse=True)
    group_ids, group_of_row = np.unique(groups, return_inverse=True)
    class_of_row, group_of_row = class_of_row.reshape(-1), group_of_row.reshape(-1)
    n_classes, n_groups = int(class_of_row.max()) + 1, len(group_ids)
    counts = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(counts, (group_of_row, class_of_row), 1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]

    fracs = (1.0 - val_frac - test_frac, val_frac, test_frac)
    targets = [[f * total for total in counts.sum(axis=0).tolist()] for f in fracs]
    filled = [[0.0] * n_classes for _ in SPLITS]
    split_of_group = np.zeros(n_groups, dtype=np.int64)
    # A Python loop over groups: 3 splits x 2 classes of float arithmetic is cheaper per group than
    # numpy call overhead (21,000 groups take ~0.1 s).
    for g in order.tolist():
        present = [(c, k) for c, k in enumerate(counts[g].tolist()) if k]
        size = sum(k for _, k in present)
        best, best_score = 0, math.inf
        for s in range(len(SPLITS)):
            if any(targets[s][c] <= 0 for c, _ in present):
                continue  # a zero-fraction split takes nothing
            score = sum(k * (filled[s][c] + k / 2) / targets[s][c] for c, k in present) / size
            if score < best_score:
                best, best_score = s, score
        split_of_group[g] = best
        for c, k in present:
            filled[best][c] += k
    return np.asarray(SPLITS)[split_of_group[group_of_row]]


__all__ = [
    "SPLITS",
    "comparison_blocks",
    "comparisons",
    "cross_class_duplicates",
    "duplicate_groups",
    "count_duplicate_groups",
    "merge_groups",
    "stratified_group_split",
]
