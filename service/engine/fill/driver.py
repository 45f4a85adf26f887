"""Fill-mask without the server: the worker's path, run synchronously (the evaluator, benches).

The same searches (:func:`job_search`), the same forward and the same chunking (:func:`forward_needs`) as the
worker (``worker.py``), minus its queue, lock, slicing and metrics, so an evaluated answer is the served answer.
Several jobs search together and their rows share forwards, as concurrent requests do in the worker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from service.config import Settings
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.forward import ForwardFn, engine_forward, forward_needs
from service.engine.fill.job import FillMaskJob, FillMaskResult
from service.engine.fill.search import Need, Picked, job_search
from service.engine.loading import LoadedModel


class FillDriver:
    """Runs fill-mask jobs to their results on one model, in the calling thread."""

    def __init__(self, model: LoadedModel, settings: Settings, forward: ForwardFn | None = None) -> None:
        self.model = model
        self.settings = settings
        self.codec = FillMaskCodec(model, settings)
        self.forward = forward or engine_forward(model)

    def run(self, jobs: Sequence[FillMaskJob]) -> Iterator[FillMaskResult]:
        """Each job's result, in order. Up to max_batch_size jobs search together, as many as the worker
        admits into one round, which bounds the outputs held at once."""
        size = self.settings.max_batch_size
        for start in range(0, len(jobs), size):
            yield from self._together(jobs[start : start + size])

    def _together(self, jobs: Sequence[FillMaskJob]) -> list[FillMaskResult]:
        for job in jobs:
            self.codec.compile(job)
        searches = [job_search(job, self.codec) for job in jobs]
        results: dict[int, FillMaskResult] = {}
        pending: dict[int, list[Need]] = {}  # per unfinished search, what its current step needs
        outs: dict[int, list[Picked]] = {}
        while True:
            for n, search in enumerate(searches):
                if n in results:
                    continue
                try:
                    pending[n] = search.send(outs[n]) if n in pending else next(search)
                except StopIteration as stop:
                    results[n] = stop.value
                    pending.pop(n, None)
            if not pending:
                return [results[n] for n in range(len(jobs))]
            needs = [need for step in pending.values() for need in step]
            picked = iter(forward_needs(needs, self.forward, self.codec.vocab, self.settings.max_batch_size))
            outs = {n: [next(picked) for _ in step] for n, step in pending.items()}
