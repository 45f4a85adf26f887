"""Fill-mask without the server: the worker's path, run synchronously (the evaluator, benches).

The same searches (:func:`job_search`), the same forward and the same chunking as the worker
(``worker.py``), minus its queue, lock, slicing and metrics, so an evaluated answer is the served answer.
Several jobs search together and their rows share forwards, as concurrent requests do in the worker.
What the forward returns per row is passed back to the searches untouched and never read here: the searches
alone know its form.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from service.config import Settings
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.forward import ForwardFn, forward_rows, head_only_matches
from service.engine.fill.job import FillMaskJob, FillMaskResult
from service.engine.fill.search import Row, job_search
from service.engine.loading import LoadedModel


def engine_forward(model: LoadedModel) -> ForwardFn:
    """The forward the worker runs: the LM head on the read positions only where that equals the full model."""
    head_only = head_only_matches(model)
    return lambda rows: forward_rows(model, rows, head_only=head_only)


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
        dims = self.model.attention_dims if self.model.steerable else (0, 0)  # as FillMaskWorker.compile
        for job in jobs:
            job.compile(self.model.dtype, dims)
        searches = [job_search(job, self.codec) for job in jobs]
        results: dict[int, FillMaskResult] = {}
        pending: dict[int, list[Row]] = {}  # per unfinished search, the rows its current step needs
        outs: dict[Row, Any] = {}
        while True:
            for n, search in enumerate(searches):
                if n in results:
                    continue
                try:
                    pending[n] = search.send([outs[r] for r in pending[n]]) if n in pending else next(search)
                except StopIteration as stop:
                    results[n] = stop.value
                    pending.pop(n, None)
            if not pending:
                return [results[n] for n in range(len(jobs))]
            outs = self.forward_unique([r for rows in pending.values() for r in rows])

    def forward_unique(self, rows: Sequence[Row]) -> dict[Row, Any]:
        """Forward distinct rows in chunks of max_batch_size, shortest first (less padding per chunk), as
        the worker's ``_compute`` does; equal rows are forwarded once."""
        unique = sorted(dict.fromkeys(rows), key=lambda r: len(r.ids))
        size = self.settings.max_batch_size
        outs: dict[Row, Any] = {}
        for start in range(0, len(unique), size):
            chunk = unique[start : start + size]
            outs.update(zip(chunk, self.forward(chunk), strict=True))
        return outs
