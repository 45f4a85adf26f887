"""Continuous batching: the decode loop runs as ticks on the compute thread; requests join and leave between.

Routes call :meth:`GenerationScheduler.submit` (compiles the request's masks once, on the compute thread, then
queues it, or refuses with 429 when ``max_running_requests + max_queued_requests`` are taken) and
read events from the returned :class:`GenerationHandle`: token events when streaming, then the result. Each
tick drops cancelled and timed-out requests, admits waiting ones up to ``max_running_requests`` (prefilling
them together, within a token budget), runs one decode step for the whole batch (holding
``engine.compute_lock`` around each forward) and, while there is work, queues the next tick. Ticks share the
compute thread (service/engine/compute.py) with fill-mask rounds, which run in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from service.config import Settings
from service.engine.compute import ComputeThread
from service.engine.generate import (
    DecodeBatch,
    GenerationJob,
    GenerationResult,
    RunningRequest,
    TokenEvent,
    compile_job,
)
from service.engine.loading import LoadedModel
from service.engine.vocab import ModelVocab
from service.errors import ClientGone, InvalidRequest, MaskserveError, NotReady, Overloaded, RequestTimeout
from service.masks.output import grammar_source
from service.metrics import BATCH_SIZE, GENERATED_TOKENS, MASKS_APPLIED, PROMPT_TOKENS, QUEUE_DEPTH, REJECTED, RUNNING

log = logging.getLogger("maskserve.generate")

WORKER = "generate"
# Most prompt tokens (padding included) prefilled in one forward: a burst of long prompts joins over several
# steps instead of stalling the running batch for one huge prefill.
PREFILL_TOKEN_BUDGET = 4096


class GenerationHandle:
    """The route's side of a submitted request: events arrive on the event loop, ``cancel()`` stops it.

    A request for n sequences has n running rows; its events interleave (each carries its sequence's index) and
    end after the n-th result."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, seqs: Sequence[RunningRequest], scheduler: GenerationScheduler
    ) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[TokenEvent | GenerationResult | MaskserveError] = asyncio.Queue()
        self._seqs = list(seqs)
        self._scheduler = scheduler
        self.request_id = seqs[0].job.request_id
        self.n = len(self._seqs)
        self._done = False

    def _post(self, event: TokenEvent | GenerationResult | MaskserveError) -> None:
        """Called from the compute thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def cancel(self) -> None:
        """Stop generating (the client went away); the slots free at the next step."""
        if self._done or all(s.cancelled for s in self._seqs):
            return
        for seq in self._seqs:
            seq.cancelled = True
        self._queue.put_nowait(ClientGone("the client closed the connection"))  # wakes anyone still waiting
        self._scheduler.wake()

    async def events(self) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Token events (streaming jobs only) and each sequence's result; ends after the last result. Raises
        the error the request ended with."""
        results = 0
        while True:
            event = await self._queue.get()
            if isinstance(event, MaskserveError):
                self._done = True
                raise event
            if isinstance(event, GenerationResult):
                results += 1
                self._done = results == self.n
            yield event
            if self._done:
                return

    async def results(self) -> list[GenerationResult]:
        """Every sequence's result, by index."""
        out = [event async for event in self.events() if isinstance(event, GenerationResult)]
        return sorted(out, key=lambda r: r.index)

    async def result(self) -> GenerationResult:
        """The result of a request for one sequence (the first one's, for n > 1)."""
        return (await self.results())[0]


class GenerationScheduler:
    def __init__(
        self, loaded: LoadedModel, settings: Settings, lock: threading.Lock, *, compute: ComputeThread | None = None
    ) -> None:
        """``compute``: the thread ticks run on (the engine's; without one, a private one is made)."""
        if loaded.generation_model is None:
            raise ValueError("the loaded model cannot generate")
        self.loaded = loaded
        self.settings = settings
        self.vocab = ModelVocab.build(loaded, settings.grammar_cache_size)
        self.batch = DecodeBatch.serving(loaded, self.vocab, lock)
        self.max_positions = int(getattr(loaded.generation_model.config, "max_position_embeddings", 0) or 1 << 30)
        self._waiting: deque[RunningRequest] = deque()
        self._mutex = threading.Lock()  # guards the queue, the counts and the tick flag
        self._active = 0  # submitted and not finished: waiting + running
        self._stopping = False
        self._tick_queued = False
        self._started = False
        self._owns_compute = compute is None
        self._compute = compute or ComputeThread()
        self._mean_request_s = 1.0  # moving average, for Retry-After

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """From now on, ticks are queued on the compute thread whenever there is work."""
        with self._mutex:
            self._started = True
            if self._waiting:
                self._queue_tick()

    async def stop(self) -> None:
        with self._mutex:
            self._stopping = True
        await self._compute.run(self._shutdown)  # after any tick already queued, which sees _stopping and returns
        if self._owns_compute:
            self._compute.shutdown()

    def wake(self) -> None:
        with self._mutex:
            self._queue_tick()

    def _queue_tick(self) -> None:
        """Queue one tick on the compute thread unless one is queued (call with the mutex held)."""
        if self._started and not self._tick_queued and not self._stopping:
            self._tick_queued = True
            self._compute.submit(self._tick)

    # --- the route's side ---------------------------------------------------------------------------------------

    async def submit(self, job: GenerationJob, *, max_new_tokens_param: str = "max_new_tokens") -> GenerationHandle:
        """Check the job's length, compile its masks, then queue it. Raises InvalidRequest, MaskError or
        Overloaded."""
        total = len(job.prompt_ids) + job.params.max_new_tokens
        if total > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(job.prompt_ids)} tokens) + {max_new_tokens_param} ({job.params.max_new_tokens}) "
                f"exceeds the model's {self.max_positions} positions",
                param=max_new_tokens_param,
            )
        n = job.params.n
        self._refuse_if_full(n)  # before compiling: a full server should answer fast
        await self.prepare(job)
        await self._compute.run(self.compile, job)
        # n sequences of one request: one seed for all (seed + i each), queued side by side, admitted together
        base = job.params.seed if job.params.seed is not None else secrets.randbits(63)
        group = object()
        seqs = [RunningRequest(job, self.batch.device, index=i, base_seed=base, group=group) for i in range(n)]
        handle = GenerationHandle(asyncio.get_running_loop(), seqs, self)
        for seq in seqs:  # one deadline for all n: they time out together
            seq.deadline = seqs[0].submitted + self.settings.request_timeout_s
            seq.emit = handle._post
        with self._mutex:
            self._refuse_if_full(n)
            self._active += n
            self._waiting.extend(seqs)
            QUEUE_DEPTH.labels(WORKER).set(len(self._waiting))
            self._queue_tick()
        for kind in job.mask_kinds:
            MASKS_APPLIED.labels(kind).inc()
        return handle

    async def prepare(self, job: GenerationJob) -> None:
        """Compile the job's regex or JSON grammar off the compute thread, within
        MASKSERVE_GRAMMAR_COMPILE_TIMEOUT_S (else InvalidRequest naming the field), so that :meth:`compile`,
        on the compute thread, finds it in the cache instead of stalling every other request."""
        found = grammar_source(job.output_mask)  # MaskError (400) for a malformed schema
        if found is None:
            return
        kind, source, param = found
        limit = self.settings.grammar_compile_timeout_s
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.vocab.grammars.prepare(kind, source)), limit)
        except TimeoutError:
            raise InvalidRequest(
                f"'{param}' did not compile within {limit:g} s (MASKSERVE_GRAMMAR_COMPILE_TIMEOUT_S); "
                "send a simpler grammar",
                param=param,
                code="grammar_timeout",
            ) from None
        except RuntimeError:  # an invalid grammar: compile() reports it, naming the field
            return

    def compile(self, job: GenerationJob) -> None:
        """Compile the job's masks once (run it on the compute thread); raises MaskError naming the field."""
        compile_job(job, self.vocab, dtype=self.batch.dtype, dims=self.loaded.attention_dims)

    def _refuse_if_full(self, n: int = 1) -> None:
        """``n``: the sequences the request would add (each takes a slot)."""
        capacity = self.settings.max_running_requests + self.settings.max_queued_requests
        if self._stopping:
            raise NotReady("the server is shutting down")
        if self._active + n > capacity:
            REJECTED.labels("queue_full").inc()
            # The wait for a slot is about one request's duration per batch of queued requests ahead.
            ahead = max(1, self._active - self.settings.max_running_requests + 1)
            wait = self._mean_request_s * ahead / self.settings.max_running_requests
            raise Overloaded(
                f"{self._active} generation requests are running or queued (the limit); retry later",
                retry_after=min(60, max(1, math.ceil(wait))),
            )

    # --- on the compute thread --------------------------------------------------------------------------------

    @torch.inference_mode()
    def _tick(self) -> None:
        """One round of the decode loop; queues the next while requests run or wait."""
        with self._mutex:
            self._tick_queued = False
            if self._stopping:
                return
            admit = self._admit()
        self._drop_cancelled()
        try:
            if admit:
                prompts = sum(len(s.job.prompt_ids) for s in admit if s.index == 0)  # once per request, not per n
                PROMPT_TOKENS.labels(WORKER).inc(prompts)
                self._finish(self.batch.add(admit))
            if self.batch.rows:
                BATCH_SIZE.labels(WORKER).observe(len(self.batch.rows))
                self._finish(self.batch.step())
        except Exception:  # a bug: fail what was running (its cache may be half-updated), keep serving
            log.exception("decode step failed")
            failed = {id(s): s for s in [*self.batch.rows, *admit]}
            self.batch.clear()
            self._finish(list(failed.values()), error=MaskserveError("generation failed"))
        RUNNING.labels(WORKER).set(len(self.batch.rows))
        with self._mutex:
            if self._waiting or self.batch.rows:
                self._queue_tick()

    def _admit(self) -> list[RunningRequest]:
        """Take waiting requests while slots and the prefill budget last (at least one if slots are free). The
        n sequences of one request are taken together (they share one prefill row)."""
        now = time.monotonic()
        for seq in [s for s in self._waiting if s.cancelled or s.deadline <= now]:
            self._waiting.remove(seq)
            self._end(seq, RequestTimeout(self._timeout_message()) if not seq.cancelled else None)
        admit: list[RunningRequest] = []
        free = self.settings.max_running_requests - len(self.batch.rows)
        longest = 0
        prompts = 0  # prefill rows: one per job
        while self._waiting:
            job, request = self._waiting[0].job, self._waiting[0].group
            group = 1
            while group < len(self._waiting) and self._waiting[group].group is request:
                group += 1
            if len(admit) + group > free:
                break
            longest_if = max(longest, len(job.prompt_ids))
            if admit and longest_if * (prompts + 1) > PREFILL_TOKEN_BUDGET:
                break
            longest, prompts = longest_if, prompts + 1
            admit += [self._waiting.popleft() for _ in range(group)]
        QUEUE_DEPTH.labels(WORKER).set(len(self._waiting))
        return admit

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        gone = [s for s in self.batch.rows if s.cancelled or s.deadline <= now]
        if not gone:
            return
        self.batch.remove(gone)
        for seq in gone:
            with self._mutex:
                self._end(seq, None if seq.cancelled else RequestTimeout(self._timeout_message()))

    def _timeout_message(self) -> str:
        return f"generation did not finish within {self.settings.request_timeout_s:g} s (MASKSERVE_REQUEST_TIMEOUT_S)"

    def _finish(self, seqs: Sequence[RunningRequest], error: MaskserveError | None = None) -> None:
        for seq in seqs:
            if seq.ended:
                continue
            if error is None:
                result = seq.result()
                seq.emit(result)
                GENERATED_TOKENS.inc(result.completion_tokens)
                took = time.monotonic() - seq.submitted
                self._mean_request_s = 0.9 * self._mean_request_s + 0.1 * took
            with self._mutex:
                self._end(seq, error)

    def _end(self, seq: RunningRequest, error: MaskserveError | None) -> None:
        """Release the request's slot, once (call with the condition held); deliver ``error`` if it failed."""
        if seq.ended:
            return
        seq.ended = True
        if error is not None:
            seq.emit(error)
        self._active -= 1

    def _shutdown(self) -> None:
        with self._mutex:
            pending = list(self._waiting) + list(self.batch.rows)
            self._waiting.clear()
            for seq in pending:
                self._end(seq, NotReady("the server is shutting down"))
        self.batch.clear()

    # --- introspection ------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        with self._mutex:
            return {"running": len(self.batch.rows), "waiting": len(self._waiting), "active": self._active}
