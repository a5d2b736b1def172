"""Worker threads for the nogil solvers, and BLAS held to one thread while they run."""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache


_EXECUTOR: list = []  # the one worker pool, created on first use and grown when needed


def _executor(n_threads: int) -> ThreadPoolExecutor:
    if not _EXECUTOR or _EXECUTOR[0][0] < n_threads:
        if _EXECUTOR:
            _EXECUTOR[0][1].shutdown(wait=False)
            _EXECUTOR.clear()
        _EXECUTOR.append((n_threads, ThreadPoolExecutor(n_threads, thread_name_prefix="tp-w1")))
    return _EXECUTOR[0][1]


def run_parallel(fn, n_threads: int, *args) -> None:
    """Run ``fn(first, n_threads, *args)`` for ``first = 0 .. n_threads-1`` on worker threads
    (``fn`` releases the GIL; it takes the work items first, first + n_threads, ...)."""
    if n_threads <= 1:
        fn(0, 1, *args)
        return
    ex = _executor(n_threads)
    futs = [ex.submit(fn, w, n_threads, *args) for w in range(n_threads)]
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
