"""The CPU path's thread pool: torchvision's C++ kernels release the GIL, so parts of one
call run at once on a few threads (each part torchvision's own computation: its bits)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# Parts of one call run at once on at most this many threads.
POOL_THREADS = 4
_pool: ThreadPoolExecutor | None = None
_pool_pid = 0


def in_pool(fn: Callable, items) -> list:
    """``[fn(item) for item in items]``, from the thread pool where torch may use more than
    one thread (torchvision's kernels release the GIL).

    Callers run below autograd (custom-op bodies, NMS); the pool's threads do not inherit
    that thread-local state, so ``fn`` runs there without grad (else torchvision's kernels
    would record a graph nobody uses). A forked child inherits the pool object but not its
    threads: it gets a pool of its own."""
    global _pool, _pool_pid
    items = list(items)
    if min(len(items), torch.get_num_threads()) < 2:
        return [fn(item) for item in items]
    if _pool is None or _pool_pid != os.getpid():
        _pool = ThreadPoolExecutor(max_workers=POOL_THREADS,
                                   thread_name_prefix="kernels-cpu", initializer=_one_thread)
        _pool_pid = os.getpid()

    def no_grad(item):
        with torch.no_grad():
            return fn(item)
    threads, started = torch.get_num_threads(), _threads_started
    try:
        return list(_pool.map(no_grad, items))
    finally:
        if _threads_started != started:    # a new pool thread set the default: restore it
            torch.set_num_threads(threads)


_threads_started = 0    # pool threads set to one thread so far (see _one_thread)


def _one_thread() -> None:
    """A pool thread's start: its torch operations run on one intra-op thread. Left at the
    default, each pool thread's first parallel operation builds an OpenMP team of its own;
    libgomp then manages more threads than there are CPUs and makes every team sleep
    between parallel regions instead of spinning: the main thread's small parallel
    operations ran 9x slower for the rest of the process (a 400 x 256 elementwise op 9 ->
    78 us here; the CPU nms at 1,000 boxes 2 -> 5 ms once roi_align had run).
    ``torch.set_num_threads`` sets the calling thread's count, and also the count threads
    started later begin with: :func:`in_pool` puts that one back."""
    global _threads_started
    torch.set_num_threads(1)
    _threads_started += 1


def ranges(total: int, count: int) -> list[tuple[int, int]]:
    """``count`` [lo, hi) ranges splitting ``total`` rows evenly, in order."""
    return [(total * i // count, total * (i + 1) // count) for i in range(count)]
