"""Worker threads for the nogil solvers, and BLAS held to one thread while they run."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np


_EXECUTOR: list = []  # the one worker pool, created on first use and grown when needed


def _executor(n_threads: int) -> ThreadPoolExecutor:
    if not _EXECUTOR or _EXECUTOR[0][0] < n_threads:
        if _EXECUTOR:
            _EXECUTOR[0][1].shutdown(wait=False)
            _EXECUTOR.clear()
        _EXECUTOR.append((n_threads, ThreadPoolExecutor(n_threads, thread_name_prefix="tp-w1")))
    return _EXECUTOR[0][1]


def run_parallel(fn, n_threads: int, *args) -> None:
    """Run ``fn(counter, *args)`` on ``n_threads`` worker threads at once (``fn`` releases the
    GIL and takes its work items one by one from the shared int64 ``counter``, item
    ``counter[0]`` then incremented atomically: dynamic scheduling)."""
    counter = np.zeros(1, np.int64)
    if n_threads <= 1:
        fn(counter, *args)
        return
    ex = _executor(n_threads)
    futs = [ex.submit(fn, counter, *args) for _ in range(n_threads)]
    for f in futs:
        f.result()


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot uses)
        from threadpoolctl import ThreadpoolController

        return ThreadpoolController()
    except Exception:  # pragma: no cover - threadpoolctl missing
        return None


def one_blas_thread(active: bool = True):
    """Context manager: BLAS single-threaded while the worker threads call sgemm (a threaded
    OpenBLAS under our threads would oversubscribe the cores). No-op without threadpoolctl or
    when ``active`` is False."""
    ctl = _blas_controller() if active else None
    return ctl.limit(limits=1, user_api="blas") if ctl is not None else contextlib.nullcontext()
