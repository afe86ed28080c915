"""Near-duplicate grouping: ``split.duplicate_groups`` against a plain XOR-and-popcount baseline.

Run from the project root:

    python benchmarks/bench_duplicates.py [--n 21000] [--bits 256] [--repeats 3]

Both sides do the same work on the same N random perceptual hashes (with planted near-duplicates
and exact duplicates): every unordered pair of distinct hashes is compared, pairs within
``--max-distance`` bits and equal sha256 strings are merged transitively, and the group ids are
returned. The baseline ("xor-popcount") compares rows in blocks with ``np.bitwise_xor`` and
``np.bitwise_count`` over the 64-bit words, then the same connected components; the product uses
one BLAS matrix product per block (Hamming distance from +-1 bit vectors). Both results must be
identical or the script exits 1. Prints each side's best of ``--repeats`` and the ratio
(baseline / product). This replaces the wall-clock assertion that used to sit in tests/test_data.py.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from common import load_average  # noqa: E402  (benchmarks/common.py)
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from cxrexp.data.split import comparisons, duplicate_groups


def baseline_groups(sha256: list[str], words: np.ndarray, max_distance: int, block: int = 512) -> np.ndarray:
    """The same grouping, written plainly: XOR + popcount over every pair, blocked."""
    n = len(sha256)
    u, v = [np.arange(n)], []
    _, first, inverse = np.unique(np.asarray(sha256), return_index=True, return_inverse=True)
    v.append(first[inverse])
    for start in range(0, n, block):
        stop = min(n, start + block)
        distance = np.bitwise_count(words[start:stop, None, :] ^ words[None, start:, :]).sum(axis=2)
        a, b = np.nonzero(distance <= max_distance)
        keep = start + a < start + b  # upper triangle: each unordered pair once
        u.append(start + a[keep])
        v.append(start + b[keep])
    rows, cols = np.concatenate(u), np.concatenate(v)
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Ids in order of first appearance, as duplicate_groups numbers them.
    _, first_seen = np.unique(labels, return_index=True)
    order = np.argsort(first_seen)
    rename = np.empty(len(order), dtype=np.int64)
    rename[order] = np.arange(len(order))
    return rename[labels]


def best_of(repeats: int, fn, *args) -> tuple[float, np.ndarray]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - started)
    return min(times), result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=21_000)
    parser.add_argument("--bits", type=int, default=256, choices=(64, 256))
    parser.add_argument("--max-distance", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    words = rng.integers(0, np.iinfo(np.uint64).max, (args.n, args.bits // 64), dtype=np.uint64, endpoint=True)
    words[100] = words[5] ^ np.uint64(0b101)  # a near-duplicate
    sha = [f"{i:064x}" for i in range(args.n)]
    sha[-1] = sha[7]  # an exact duplicate
    print(f"N={args.n} hashes of {args.bits} bits, max distance {args.max_distance}; "
          f"{comparisons(args.n):,} distance cells; load average {load_average()}")
    product_s, product = best_of(args.repeats, duplicate_groups, sha, words, args.max_distance)
    baseline_s, baseline = best_of(args.repeats, baseline_groups, sha, words, args.max_distance)
    if not np.array_equal(product, baseline):
        print("MISMATCH: the two groupings differ", file=sys.stderr)
        return 1
    print(f"duplicate_groups {product_s:.2f} s, xor-popcount baseline {baseline_s:.2f} s: "
          f"ratio {baseline_s / product_s:.1f}x (same {int(product.max()) + 1} groups)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
