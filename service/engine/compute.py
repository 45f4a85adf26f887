"""The one thread that runs the model: loading, fill-mask rounds, decode steps, mask compiles, probes.

Why one thread: torch's CPU kernels run on OpenMP, and every thread that runs a parallel region keeps its own
OpenMP team. Once a process has more team threads than cores, libgomp throttles their spin-waits and each
parallel region pays a futex wake-up instead. ``bench/threads.py`` on this 2-core machine: a 576x1536
matrix-vector product takes 60 us while one thread computes and 179-196 us in both threads once a second one
has computed; a SmolLM2 decode step 34.3 ms in the thread that loaded the model, 75.0 ms in another.
So every piece of model work is submitted here, and the event loop's own small tensor work (masks, reports)
runs with one OpenMP thread (:func:`keep_single_threaded`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_THREADS = torch.get_num_threads()  # torch's default (physical cores), read before anyone changes it


class ComputeThread:
    """A single worker thread, FIFO: model work from every route and worker takes turns here."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or DEFAULT_THREADS
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="maskserve-compute", initializer=torch.set_num_threads, initargs=(self.threads,)
        )

    def submit(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        return self._executor.submit(fn, *args, **kwargs)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` on the compute thread and await its result from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def keep_single_threaded() -> None:
    """Call on the event loop's thread before the compute thread starts: its own tensor work (masks, reports)
    then never forms a second OpenMP team. (torch.set_num_threads also sets torch's and MKL's process-wide
    count, which the compute thread sets back to its own when it starts; MKL's count is per thread.)"""
    torch.get_num_threads()  # torch's lazy per-thread init happens now, so it cannot undo the line below later
    torch.set_num_threads(1)
