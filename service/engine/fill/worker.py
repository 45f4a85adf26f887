"""The fill-mask worker: dynamic batching of the searches of concurrent requests.

It groups one step of every running search into padded forwards, one round at a time on the engine's compute
thread, under the engine's ``compute_lock``. Rows are right-padded and read under a bidirectional 4D mask with
explicit position ids (``service/masks/fill.py``), so a request scores the same alone or in a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from service import metrics
from service.config import Settings
from service.engine.compute import ComputeThread
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.forward import ForwardFn, engine_forward, forward_needs
from service.engine.fill.job import FillMaskJob, FillMaskResult
from service.engine.fill.search import Need, Picked, Row, job_search
from service.engine.loading import LoadedModel
from service.errors import ClientGone, NotReady, Overloaded, RequestTimeout

log = logging.getLogger("maskserve.fill_mask")

WORKER = "fill_mask"  # metrics label


@dataclass(eq=False)
class _Pending:
    job: FillMaskJob
    future: asyncio.Future[FillMaskResult]
    search: Generator[list[Need], list[Picked], FillMaskResult] | None = None
    needs: list[Need] = field(default_factory=list)  # the rows the search's current step needs
    done: list[Picked] = field(default_factory=list)  # their outputs so far (a step may span several rounds)
    result: FillMaskResult | None = None
    error: BaseException | None = None
    abandoned: bool = False  # timed out or client gone: dropped before any further forward

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None


class FillMaskWorker:
    """Dynamic batching for fill-mask: a bounded queue, rounds of padded forwards in a thread."""

    def __init__(
        self,
        model: LoadedModel,
        settings: Settings,
        compute_lock: threading.Lock,
        forward: ForwardFn | None = None,
        *,
        compute: ComputeThread | None = None,
    ) -> None:
        """``compute``: the thread rounds run on (the engine's; without one, a private one is made)."""
        self.model = model
        self.settings = settings
        self.codec = FillMaskCodec(model, settings)
        self._lock = compute_lock
        self._forward = forward or engine_forward(model)
        self._capacity = settings.max_batch_size + settings.max_queued_requests
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._arrived = asyncio.Event()
        self._outstanding = 0  # queued + running
        self._active: list[_Pending] = []  # admitted: their searches advance one step per round
        self._held: list[_Pending] = []  # taken from the queue, waiting for the row budget (see _fits)
        self._task: asyncio.Task[None] | None = None
        # The last round ran one request and none arrived meanwhile: a lone client, whom the batch window
        # would only delay (an idle server's first request of a burst then runs alone; the rest batch next).
        self._alone = False
        self._owns_compute = compute is None
        self._runner = compute or ComputeThread()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fill-mask-worker")

    async def stop(self) -> None:
        """Stop the loop; requests still queued or running fail with 503."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        waiting = self._active + self._held + [self._queue.get_nowait() for _ in range(self._queue.qsize())]
        for pending in waiting:
            if not pending.future.done():
                pending.future.set_exception(NotReady("the server is shutting down"))
        self._active = []
        self._held = []
        if self._owns_compute:
            self._runner.shutdown()

    async def submit(
        self, job: FillMaskJob, *, client_gone: Callable[[], Awaitable[object]] | None = None
    ) -> FillMaskResult:
        """Queue a job and wait for its result (RequestTimeout, Overloaded, ClientGone otherwise).

        ``client_gone`` makes an awaitable that finishes when the client disconnects (made only once queued).
        """
        if self._outstanding >= self._capacity:
            metrics.REJECTED.labels("queue_full").inc()
            raise Overloaded(f"fill-mask queue is full ({self._capacity} requests running or waiting); retry shortly")
        self.compile(job)
        pending = _Pending(job, asyncio.get_running_loop().create_future())
        self._outstanding += 1
        self._queue.put_nowait(pending)
        self._arrived.set()
        metrics.QUEUE_DEPTH.labels(WORKER).set(self._queue.qsize())
        gone = asyncio.ensure_future(client_gone()) if client_gone is not None else None
        try:
            waiting: set[asyncio.Future[Any]] = {pending.future} | ({gone} if gone else set())
            done, _ = await asyncio.wait(
                waiting, timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if pending.future in done:
                return pending.future.result()
            if gone is not None and gone in done:
                raise ClientGone("the client closed the connection")
            raise RequestTimeout(
                f"fill-mask did not finish within {self.settings.request_timeout_s:g} s (MASKSERVE_REQUEST_TIMEOUT_S)"
            )
        finally:
            if not pending.future.done():
                pending.abandoned = True
                pending.future.cancel()
            if gone is not None:
                gone.cancel()

    def compile(self, job: FillMaskJob) -> None:
        """Compile the job's masks once (its attention constraints, for every width its searches use)."""
        self.codec.compile(job)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        wait_s = self.settings.max_batch_wait_ms / 1000
        while True:
            if not self._active and not self._held:
                self._held.append(await self._queue.get())
                # a fresh batch: let concurrent requests join it, unless the requests come one at a time
                deadline = loop.time() + (0.0 if self._alone else wait_s)
            else:
                deadline = loop.time()  # searches mid-way go on at once, with whatever has queued meanwhile
            self._held = self._retire(self._held, lambda p: p.abandoned)
            while len(self._active) < self.settings.max_batch_size:
                ready = next((p for p in self._held if self._fits(p)), None)  # in arrival order
                if ready is not None:
                    self._held.remove(ready)
                    self._active.append(ready)
                    continue
                if not self._queue.empty():
                    self._held.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            self._active = self._retire(self._active, lambda p: p.abandoned)
            metrics.QUEUE_DEPTH.labels(WORKER).set(self._queue.qsize() + len(self._held))
            metrics.RUNNING.labels(WORKER).set(len(self._active))
            if not self._active:
                continue
            try:
                await self._runner.run(self._round, self._active)
            except Exception as exc:  # a bug in the round itself: fail its requests, keep serving others
                log.exception("fill-mask round failed")
                for p in self._active:
                    p.error = p.error or exc
            for p in self._active:
                if p.finished and not p.future.done():
                    if p.error is not None:
                        p.future.set_exception(p.error)
                    else:
                        p.future.set_result(p.result)  # type: ignore[arg-type]
            self._alone = len(self._active) == 1 and self._queue.empty() and not self._held
            self._active = self._retire(self._active, lambda p: p.finished)
            # After the round, not only before it: once the last search finishes the gauge must read 0 at rest.
            metrics.RUNNING.labels(WORKER).set(len(self._active))
            metrics.QUEUE_DEPTH.labels(WORKER).set(self._queue.qsize() + len(self._held))

    def _fits(self, p: _Pending) -> bool:
        """Whether a job may join the running ones. Each running job keeps the outputs of its current step,
        so costly jobs (more rows than one round takes of them) run together only while their admitted rows
        fit MASKSERVE_MAX_FILL_ROWS; cheap ones always join, and a costly one always may when it is alone:
        a round's memory stays bounded whatever arrives, and cheap requests never wait for costly ones."""
        cap = self.settings.max_fill_rows_per_round
        if p.job.rows <= cap:
            return True
        costly = sum(q.job.rows for q in self._active if q.job.rows > cap)
        return costly == 0 or costly + p.job.rows <= self.settings.max_fill_rows

    def _retire(self, active: list[_Pending], gone: Callable[[_Pending], bool]) -> list[_Pending]:
        kept = [p for p in active if not gone(p)]
        self._outstanding -= len(active) - len(kept)
        return kept

    def _round(self, active: list[_Pending]) -> None:
        """In a thread: start new searches, forward every row they need, advance each by one step."""
        for p in active:
            if p.search is None:
                for kind in p.job.mask_kinds:
                    metrics.MASKS_APPLIED.labels(kind).inc()
                p.search = job_search(p.job, self.codec)
                self._advance(p, None)
        live = [p for p in active if not p.finished]
        if not live:
            return
        # At most max_fill_rows_per_round of each job's rows go into one round: a huge step is sliced across
        # rounds, so other jobs and the decode ticks queued on the compute thread take turns in between, and a
        # job abandoned meanwhile (client gone, timed out) is dropped before its next slice.
        cap = self.settings.max_fill_rows_per_round
        slices = {id(p): p.needs[len(p.done) : len(p.done) + cap] for p in live}
        needs = [need for p in live for need in slices[id(p)]]
        try:
            outs = iter(forward_needs(needs, self._forward_chunk, self.codec.vocab, self.settings.max_batch_size))
        except Exception as exc:  # a failed forward fails its round, not the worker
            log.exception("fill-mask forward failed")
            for p in live:
                p.error = exc
            return
        for p in live:
            p.done.extend(next(outs) for _ in slices[id(p)])
            if len(p.done) == len(p.needs):
                step, p.done = p.done, []
                self._advance(p, step)

    def _advance(self, p: _Pending, outs: list[Picked] | None) -> None:
        assert p.search is not None
        try:
            p.needs = next(p.search) if outs is None else p.search.send(outs)
        except StopIteration as stop:
            p.result = stop.value
        except Exception as exc:
            log.exception("fill-mask search failed")
            p.error = exc

    def _forward_chunk(self, chunk: Sequence[Row]) -> list[Tensor]:
        """One padded forward under the compute lock (the generation worker's ticks take turns with it)."""
        with self._lock:
            logps = self._forward(chunk)
        metrics.BATCH_SIZE.labels(WORKER).observe(len(chunk))
        metrics.PROMPT_TOKENS.labels(WORKER).inc(sum(len(r.ids) for r in chunk))
        return logps
