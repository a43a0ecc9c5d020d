"""One derivative call split into concurrent parts ("lanes"), each run by onnxruntime on a
session of one thread, instead of one call whose operators share the threads.

onnxruntime parallelises inside each operator, and on image networks' many small
convolutions that gains little: with two threads, MobileNetV3-small's tiled VJP at 16
samples took 72 ms as one call on a two-thread session and 44 ms as two concurrent calls of
8 samples on one-thread sessions (81 ms with one thread); ResNet-18 337 against 300 ms. On
the LSTM and the Conv1d net the operators' own threads win (0.7 against 1.4 ms at one
sample): which is faster depends on the model, so both are strategies for the engine's tuner
(``OnnxModel.strategies``). A call is split along its samples where it has at least one per
lane (no work repeated: samples are independent), else along its seeds (each part runs the
forward part again for its seeds, a small share where k seeds share it). onnxruntime
releases the GIL while a session runs, so the lanes are threads of one process; their arrays
together are the whole call's, so the memory the engine plans for is unchanged."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from ...model import _leading, _shared_leading

Arrays = dict[str, np.ndarray]
_pools: dict[int, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def splits(xs: Arrays, seeds: Arrays, lanes: int) -> bool:
    """Whether a call of these samples and seeds (``seeds``: k x B x ...) can run in ``lanes``."""
    b = _shared_leading(xs)
    return lanes > 1 and bool(b) and (b >= lanes or _leading(seeds) >= lanes)


def run(one: Callable[[Arrays, Arrays], Arrays], xs: Arrays, seeds: Arrays, lanes: int) -> Arrays:
    """``one(xs, seeds)`` (results k x B x ..., as ``seeds``) in ``lanes`` concurrent parts:
    along the B samples where there are at least ``lanes``, else along the k seeds; whole
    where neither is possible (``splits``)."""
    if not splits(xs, seeds, lanes):
        return one(xs, seeds)
    b, k = _shared_leading(xs), _leading(seeds)
    by_sample = b >= lanes
    cuts = _cuts(b if by_sample else k, lanes)
    if by_sample:
        parts = [({n: v[c0:c1] for n, v in xs.items()}, {n: v[:, c0:c1] for n, v in seeds.items()}) for c0, c1 in cuts]
    else:
        parts = [(xs, {n: v[c0:c1] for n, v in seeds.items()}) for c0, c1 in cuts]
    futures = [_pool(lanes).submit(one, *part) for part in parts[1:]]
    try:
        outs = [one(*parts[0])]
    finally:
        rest = [f.result() for f in futures]  # (the others finish before the first's error propagates)
    outs += rest
    return {n: np.concatenate([o[n] for o in outs], axis=1 if by_sample else 0) for n in outs[0]}


def _cuts(n: int, lanes: int) -> list[tuple[int, int]]:
    edges = [round(i * n / lanes) for i in range(lanes + 1)]
    return list(zip(edges, edges[1:]))


def _pool(lanes: int) -> ThreadPoolExecutor:
    """The threads that run all but the caller's part (the caller runs the first)."""
    with _lock:
        if lanes not in _pools:
            _pools[lanes] = ThreadPoolExecutor(lanes - 1, thread_name_prefix="jacli-lane")
        return _pools[lanes]
