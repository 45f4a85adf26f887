"""The engine: one loaded model and the workers that run it, with a lifecycle.

``Engine.start()`` loads the model off the event loop (``/ready`` answers 503 meanwhile), then starts the
workers; ``Engine.stop()`` drains and stops them. Routes reach the engine through ``app.state.engine``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from service.config import Settings
from service.engine.compute import ComputeThread, keep_single_threaded
from service.engine.fill.forward import fill_attention_weights
from service.engine.fill.job import FillMaskJob
from service.engine.fill.worker import FillMaskWorker
from service.engine.generate import GenerationJob, prompt_attention_weights
from service.engine.loading import LoadedModel, load_model
from service.engine.scheduler import GenerationScheduler
from service.errors import InvalidRequest, NotReady, UnsupportedForModel

log = logging.getLogger("maskserve.engine")


class Engine:
    def __init__(self, settings: Settings, loaded: LoadedModel | None = None) -> None:
        self.settings = settings
        self.model: LoadedModel | None = loaded
        self.load_error: str | None = None
        self.ready = False
        # One forward at a time on the device: fill-mask batches and decode steps take turns. Both would
        # fight for the same cores (or GPU stream) anyway; the lock keeps each forward's timing clean.
        self.compute_lock = threading.Lock()
        self.compute = ComputeThread(settings.torch_threads)  # every piece of model work runs on this thread
        self.generation: GenerationScheduler | None = None  # continuous-batching decode loop (decoders)
        self.fill_mask: FillMaskWorker | None = None  # dynamic batching of fill-mask searches

    async def start(self) -> None:
        keep_single_threaded()  # this is the event loop's thread: its tensor work stays off OpenMP teams
        try:
            if self.model is None:
                self.model = await self.compute.run(load_model, self.settings)
            await self._start_workers()
        except Exception as exc:  # a model that cannot load keeps /ready at 503 and says why in the log
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        self.ready = True

    async def _start_workers(self) -> None:
        """Start the per-task workers for what the loaded model can do."""
        assert self.model is not None
        if self.model.fill_mask_model is not None:
            # built in a thread: it classifies the vocabulary and checks the head-only forward (~1 s)
            self.fill_mask = await self.compute.run(
                FillMaskWorker, self.model, self.settings, self.compute_lock, compute=self.compute
            )
            await self.fill_mask.start()
        if self.model.generation_model is not None:
            self.generation = await self.compute.run(
                GenerationScheduler, self.model, self.settings, self.compute_lock, compute=self.compute
            )
            self.generation.start()

    async def stop(self) -> None:
        self.ready = False
        if self.fill_mask is not None:
            await self.fill_mask.stop()
        if self.generation is not None:
            await self.generation.stop()
        self.compute.shutdown()

    def require_generation(self) -> GenerationScheduler:
        self.require()
        if self.generation is None:
            raise UnsupportedForModel("this model cannot generate text (it is an encoder); use /v1/fill-mask")
        return self.generation

    def require(self) -> LoadedModel:
        if not self.ready or self.model is None:
            raise NotReady("the model is still loading; retry shortly (see GET /ready)")
        return self.model

    def fill_mask_worker(self) -> FillMaskWorker:
        self.require()
        if self.fill_mask is None:
            raise UnsupportedForModel(
                "this model cannot fill masks: it is a decoder without an MNTP adapter; start the service with "
                "MASKSERVE_ADAPTER set to an adapter trained by `maskserve finetune --objective mntp`"
            )
        return self.fill_mask

    @property
    def model_id(self) -> str:
        return self.require().name

    def info(self) -> dict[str, Any]:
        """The hosted model, as ``GET /v1/models`` lists it."""
        return {"id": self.model_id, "object": "model", "owned_by": "maskserve", **self.require().describe()}

    async def attention_weights(
        self, job: GenerationJob | FillMaskJob, layer: int | None, *, max_tokens: int
    ) -> torch.Tensor:
        """One forward of the job's prompt (fill-mask: its first input) under its compiled masks: the attention
        weights averaged over heads, and over layers unless ``layer``.  # -> (T, T)"""
        loaded = self.require()
        if not loaded.steerable:
            raise InvalidRequest("attention weights need the model to run SDPA attention", param="attention_weights")
        n_layers = loaded.attention_dims[0]
        if layer is not None and layer >= n_layers:
            raise InvalidRequest(f"the model has {n_layers} layers (0..{n_layers - 1})", param="attention_layer")
        n_tokens = len(job.prompt_ids) if isinstance(job, GenerationJob) else len(job.inputs[0].ids)
        if n_tokens > max_tokens:
            raise InvalidRequest(f"attention weights are offered for up to {max_tokens} tokens",
                                 param="attention_weights")  # fmt: skip
        if isinstance(job, GenerationJob):
            model, ids, attention = loaded.generation_model, job.prompt_ids, job.attention
            per_layer = await self.compute.run(prompt_attention_weights, model, ids, attention, self.compute_lock)
        else:
            per_layer = await self.compute.run(fill_attention_weights, loaded, job.inputs[0], self.compute_lock)
        if len(per_layer) != n_layers:  # an architecture whose attention modules bypass AttentionInterface
            raise InvalidRequest("this model's attention layers do not report their weights", param="attention_weights")
        if layer is not None:
            return per_layer[layer]
        return torch.stack(list(per_layer.values())).mean(dim=0)  # (T, T)
