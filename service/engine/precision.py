"""Precision: how the served weights are stored and multiplied — float32, bfloat16, float16, or int8.

``apply_precision(model, precision)`` runs once per model, in service/engine/loading.py, after any adapter
has been merged (so a LoRA delta is quantized with its base, never added to int8 weights):

- ``float32`` / ``bfloat16`` / ``float16``: the model is cast, nothing else changes;
- ``int8``: weight-only quantization. Every ``nn.Linear`` (attention and MLP projections, the LM head)
  becomes an :class:`Int8Linear`: int8 weights with one scale per output channel (absmax / 127),
  ``torch._weight_int8pack_mm`` as the kernel (it takes bfloat16 activations). The rest of the model
  (embeddings, norms, attention itself) and the activations between the layers run in the float dtype this
  device computes faster (:func:`activation_dtype`): bfloat16 on CUDA and on CPUs with fast bfloat16 GEMM,
  float32 on CPUs that emulate bfloat16 arithmetic (there decode steps run maskserve's own float32 kernel,
  below, or cast to bfloat16 for torch's and back). A decode step reads ~135 MB of weights for SmolLM2-135M instead of
  540 MB (float32): at batch 1 the step is bound by reading weights (docs/generation.md).

The LM head of a decoder is tied to the input embeddings. The embedding lookup needs the table in a float
dtype, so the tie is broken: the embedding keeps its table (in the activations' dtype) for the lookup, the
head gets an Int8Linear of its own (the head's extra memory is its int8 copy, 28 MB for SmolLM2).

**Kernels by the number of rows.** ``_weight_int8pack_mm`` wins while a matmul is bound by reading its
weights (few rows); its time grows with every row, and from ~16 rows dense GEMM is faster (prefill,
fill-mask, large decode batches; bench/int8_crossover.py measures it, docs/generation.md has the table).
So each Int8Linear also keeps its weights *de-quantized* (bfloat16 or float32) and dispatches by its input:
a decode step of fewer than ``dense_from_rows`` rows runs the int8 kernel, everything else dense GEMM (or
int8 GEMM, below, for large decode batches; :meth:`Int8Linear.kernel` says why multi-token forwards never
run int8). The dense copy is the de-quantized int8 weights (``q * scale``), not the original ones, so both
kernels compute the same model up to rounding of the products; the price is the copy's memory (2 bytes a
weight beside the int8 byte: 3 bytes a weight in all, against 4 for float32). The copy has the activations'
dtype: bfloat16 unless this CPU runs float32 GEMM faster (:func:`fastest_dense_dtype`, timed once at load),
then float32 (5 bytes a weight in all).

**maskserve's own CPU kernels** (service/engine/int8_kernels.c, ``MASKSERVE_INT8_KERNELS``, on by default;
built with the system C compiler at load, else torch's kernels stay). Where the activations are float32, decode
steps below ``dense_from_rows`` rows run its float32 product instead of ``_weight_int8pack_mm``: the same int8
weights and scales, float32 rows, no casts, the weights read once with prefetch. Int8 GEMM (below) runs its
VNNI product instead of ``torch._int_mm``, with the same numbers. Both compute each row alone, bit for bit.

**Int8 GEMM for decode batches** (``MASKSERVE_INT8_DECODE_GEMM``, on by default). A decode batch of
``dense_from_rows`` rows or more may instead quantize its activations too, one symmetric int8 scale *per row*
(absmax / 127), and multiply int8 by int8 into int32 (``torch._int_mm``, VNNI on x86), scaling the sums by the
row's and the output channel's scales. Where this CPU runs that faster than the dense copy
(:func:`int8_gemm_is_faster`, timed once at load) every decode batch from ``dense_from_rows`` rows takes it.
Integer sums are exact and each row has its own scale, so a row's output does not depend on the rows beside
it, bit for bit (a per-tensor scale, as torch's dynamic quantization uses, would let one request's activations
round another's). It rounds each activation to 1/254 of its row's largest: docs/generation.md ("Precision")
has its quality guard. Prefill never takes it (:meth:`Int8Linear.kernel`).

**Int8 GEMM for every forward of a model that never decodes** (the fill-mask model). Its forwards all have
many rows, where the weight-only kernel never runs; int8 GEMM computes each row alone, bit for bit, so every
forward of it (the body's ``(B, T, K)``, the head's gathered ``(R, K)``) may take it without a request's scores
ever depending on the requests beside it. It does where this CPU runs it faster than the dense copy at many
rows (:func:`int8_gemm_is_faster` at ``FILL_ROWS``), and then holds no dense copy (2 bytes a weight less, or 4).

Masks and logits need nothing here: the engine builds 4D masks in the model's parameter dtype
(``next(model.parameters()).dtype`` — the float embeddings come first) and casts logits to float32
before log-softmax, sampling and output masks (service/engine/generate.py, service/engine/fill/forward.py).
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor, nn

from service.config import Precision
from service.engine import int8_kernels

log = logging.getLogger("maskserve.precision")

WEIGHT_ONLY_DTYPE = torch.bfloat16  # torch's CPU weight-only kernels are vectorised for bfloat16 activations only
# At and above this many rows an Int8Linear runs dense GEMM on its de-quantized copy (measured crossover:
# bench/int8_crossover.py, docs/generation.md "Precision").
DENSE_FROM_ROWS = 16
# The rows int8 GEMM is timed at for a model whose every forward has many rows (a fill-mask batch: 32 requests
# of ~16 tokens).
FILL_ROWS = 512
# torch 2.13's CPU _weight_int8pack_mm crashes (segfault, no error) unless in_features is a multiple of 16.
INT8_K_MULTIPLE = 16
FLOAT_DTYPES = {
    Precision.FLOAT32: torch.float32,
    Precision.BFLOAT16: torch.bfloat16,
    Precision.FLOAT16: torch.float16,
}


def resolve_precision(
    precision: Precision, device: torch.device, *, many_rows: bool = False, own_kernels: bool = True
) -> Precision:
    """``auto``: bfloat16 on CUDA; on CPU int8 weight-only (fastest at decoding, docs/generation.md).

    ``many_rows``: for a model whose every forward has many rows (the fill-mask model). Such forwards never run
    the weight-only kernel: under int8 they run int8 GEMM where that is faster, else the de-quantized copy. On
    a CPU where float32 GEMM is the faster dense one (:func:`fastest_dense_dtype`) and int8 GEMM is not faster
    still, int8 would be float32 GEMM on rounded weights: ``auto`` is float32 there. ``own_kernels``: int8 GEMM
    may run int8_kernels.c's product (``MASKSERVE_INT8_KERNELS``).
    """
    if precision is not Precision.AUTO:
        return precision
    if device.type == "cuda":
        return Precision.BFLOAT16
    dense = fastest_dense_dtype()
    if many_rows and dense == torch.float32:
        own = own_kernels and int8_kernels.gemm_available()
        return Precision.INT8 if int8_gemm_is_faster(dense, own, rows=FILL_ROWS) else Precision.FLOAT32
    return Precision.INT8


def activation_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype activations, masks and the KV cache have under ``precision`` (not ``auto``) on ``device``.

    Under int8 it is the float dtype whose GEMM this device runs faster (the dtype of the de-quantized copy
    too): on a CPU that emulates bfloat16 arithmetic, norms, attention and the element-wise work between the
    int8 products are faster in float32 as well (docs/generation.md, issue 13's seventh round)."""
    if precision is Precision.INT8:
        return fastest_dense_dtype() if device.type == "cpu" else WEIGHT_ONLY_DTYPE
    return FLOAT_DTYPES[precision]


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8, one scale per output row: (O, K) float -> (O, K) int8, (O,) bfloat16 scales.

    The scale is rounded to bfloat16 (the kernel's dtype) *before* the weights are divided by it, so
    ``q * scale`` is the nearest int8 grid point under the scale the kernel really uses.
    """
    w = weight.detach().float()  # (O, K)
    scale = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).to(WEIGHT_ONLY_DTYPE)  # (O,)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (O, K)
    return q.contiguous(), scale


class Kernel(StrEnum):
    """Which product an :class:`Int8Linear` runs for an input (:meth:`Int8Linear.kernel`)."""

    WEIGHT_ONLY = "weight_only"  # int8 weights, float rows: torch._weight_int8pack_mm or int8_kernels.c
    INT8_GEMM = "int8_gemm"  # torch._int_mm: int8 weights, int8 activations with a scale a row
    DENSE = "dense"  # GEMM on the de-quantized copy (bfloat16 or float32)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 with one scale a row: (N, K) float -> (N, K) int8, (N, 1) float32 scales.

    Each row is scaled by its own absmax, so a row's integers never depend on the other rows of the batch.
    """
    x = x.float()  # (N, K)
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # (N, 1)
    # Times the reciprocal rather than divided, as int8_kernels.c does (bit for bit): a multiply is cheaper.
    return torch.round(x * (1.0 / scale)).clamp(-127, 127).to(torch.int8), scale


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is None and b is None or (a is not None and b is not None and torch.equal(a, b))


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W stored as int8 rows and per-output-channel bfloat16 scales.

    Input any float dtype ``(..., K)``; output the input's dtype ``(..., O)``. A decode step of fewer than
    ``dense_from_rows`` rows runs ``torch._weight_int8pack_mm``; larger decode batches run int8 GEMM where
    ``int8_gemm`` is set, else GEMM on the de-quantized copy, as every other input does (:meth:`kernel`;
    ``dense_from_rows=None``: always the weight-only kernel, and no copy is kept).
    """

    def __init__(
        self,
        weight: Tensor,
        bias: Tensor | None,
        *,
        dense_from_rows: int | None = DENSE_FROM_ROWS,
        dense_dtype: torch.dtype = WEIGHT_ONLY_DTYPE,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        q, scale = quantize_per_channel(weight)
        self.qweight: Tensor
        self.scales: Tensor
        self.register_buffer("qweight", q)  # (O, K) int8
        self.register_buffer("scales", scale)  # (O,) bfloat16
        self.bias: Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (O,), cast at load
        self.dense_from_rows = dense_from_rows
        self.dense: Tensor | None
        dense = self.dequantized(dense_dtype) if dense_from_rows is not None else None
        self.register_buffer("dense", dense)  # (O, K) bfloat16 or float32 (the activations' dtype)
        self.int8_gemm = False  # decode batches of dense_from_rows rows or more: int8 GEMM (set at load)
        self.int8_every_forward = False  # every forward: int8 GEMM (a model that never decodes; set at load)
        # maskserve's kernels (int8_kernels.c), bound at load where they build here (:meth:`bind_kernels`):
        # ``matvec`` for decode steps below dense_from_rows with float32 rows, ``gemm`` for int8 GEMM. Plain
        # attributes, not buffers: they are read ~120 times a decode step.
        self.matvec: int8_kernels.Int8Weights | None = None
        self.gemm: int8_kernels.Int8GemmWeights | None = None
        # Int8 GEMM's smoothing (:meth:`smooth`): the activations are divided by ``smoothing`` channel-wise and
        # multiply ``gemm_qweight``, the weights times ``smoothing`` re-quantized. None: not calibrated.
        self.smoothing: Tensor | None
        self.gemm_qweight: Tensor | None
        self.gemm_scales: Tensor | None
        self.register_buffer("smoothing", None)  # (K,) float32
        self.register_buffer("gemm_qweight", None)  # (O, K) int8
        self.register_buffer("gemm_scales", None)  # (O,) bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dense_from_rows: int | None = DENSE_FROM_ROWS) -> Int8Linear:
        return cls(linear.weight, linear.bias, dense_from_rows=dense_from_rows)

    @classmethod
    def stacked(cls, parts: Sequence[Int8Linear]) -> Int8Linear:
        """One Int8Linear computing ``parts`` side by side (outputs concatenated, one kernel call instead of
        several), holding their very int8 rows and scales; each part is re-pointed at views of its buffers, so
        nothing is held twice. Raises ValueError for parts of different inputs, kernels or bias."""
        first = parts[0]
        if any(p.in_features != first.in_features or p.dense_from_rows != first.dense_from_rows for p in parts):
            raise ValueError("stacked parts must share in_features and dense_from_rows")
        if len({p.bias is None for p in parts}) != 1:
            raise ValueError("stacked parts must all have a bias or none")
        if not all(_same(p.smoothing, first.smoothing) for p in parts):
            raise ValueError("stacked parts must share one int8 GEMM smoothing (they read the same input)")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = first.in_features, sum(p.out_features for p in parts)
        out.dense_from_rows = first.dense_from_rows
        out.int8_gemm, out.int8_every_forward = first.int8_gemm, first.int8_every_forward
        out.matvec, out.gemm = None, None
        out.register_buffer("smoothing", first.smoothing)  # (K,): the parts' one input
        for name in ("qweight", "scales", "bias", "dense", "gemm_qweight", "gemm_scales"):
            pieces = [getattr(p, name) for p in parts]
            whole = None if pieces[0] is None else torch.cat(pieces)  # (sum O, ...)
            out.register_buffer(name, whole)
            start = 0
            for p in parts:
                if whole is not None:
                    setattr(p, name, whole[start : start + p.out_features])  # a view of the stacked rows
                start += p.out_features
        # Bound to the stacked rows, so the parts' own tensors are freed. The parts' float32 products bind views
        # (no copy); int8 GEMM packs its weights, so only the stacked module keeps that kernel (the parts, on
        # transformers' forward, run torch._int_mm: the same numbers).
        out.bind_kernels(matvec=first.matvec is not None, gemm=first.gemm is not None)
        for p in parts:
            p.bind_kernels(matvec=first.matvec is not None, gemm=False)
        return out

    @property
    def weight(self) -> Tensor:
        """The effective weights (``q * scale``, in the copy's dtype), for code that reads a linear's ``weight``
        (its shape, e.g. the vocabulary size of an LM head).  # (O, K)"""
        return self.dense if self.dense is not None else self.dequantized()

    def dequantized(self, dtype: torch.dtype = WEIGHT_ONLY_DTYPE) -> Tensor:
        """The weights the int8 kernel multiplies by, ``q * scale``, in ``dtype``.  # (O, K)"""
        return (self.qweight.float() * self.scales.float()[:, None]).to(dtype)

    def settle_dtypes(self, dtype: torch.dtype) -> None:
        """Put each buffer in the dtype its kernel takes: the de-quantized copy in ``dtype`` (the activations'),
        computed from the int8 weights (never cast from a rounded copy), the scales in bfloat16. Called after a
        model-wide ``.to(dtype)``, which casts every float buffer: the scales are bfloat16 values, so casting
        them back is exact."""
        self.scales = self.scales.to(WEIGHT_ONLY_DTYPE)
        if self.gemm_scales is not None:
            self.gemm_scales = self.gemm_scales.to(WEIGHT_ONLY_DTYPE)
        if self.dense is not None:
            self.dense = self.dequantized(dtype)
        self.bind_kernels(matvec=self.matvec is not None, gemm=self.gemm is not None)  # to the new scales

    def bind_kernels(self, *, matvec: bool, gemm: bool) -> None:
        """Run int8_kernels.c's products on the current int8 buffers (call again after replacing them):
        ``matvec`` for decode steps below ``dense_from_rows`` with float32 rows, ``gemm`` for int8 GEMM (where K
        is a multiple of 64); otherwise torch's kernels."""
        self.matvec = int8_kernels.Int8Weights(self.qweight, self.scales, self.bias) if matvec else None
        weights, scales = self.qweight, self.scales
        if self.smoothing is not None:
            assert self.gemm_qweight is not None
            assert self.gemm_scales is not None
            weights, scales = self.gemm_qweight, self.gemm_scales
        fits = self.in_features % int8_kernels.GEMM_K_MULTIPLE == 0
        self.gemm = int8_kernels.Int8GemmWeights(weights, scales, self.smoothing) if gemm and fits else None

    def kernel(self, shape: tuple[int, ...] | torch.Size) -> Kernel:
        """Which product an input of ``shape`` runs: int8 GEMM for every input where ``int8_every_forward``
        (a model that never decodes), else by the shape.

        A decode step, ``(B, 1, K)``, dispatches by its rows B: the weight-only int8 kernel below
        ``dense_from_rows``, from there int8 GEMM (where ``int8_gemm`` is set) or the dense copy. Every other
        forward — prefill and fill-mask ``(B, T, K)`` with T > 1, the fill-mask head on gathered positions
        ``(R, K)`` — has many rows by nature and always runs the dense copy, so a request's prefill and
        fill-mask never change kernel with the number of requests sharing the forward (switching would change
        every output's rounding: the kernels round differently). Both int8 kernels compute each row alone, bit
        for bit; bfloat16 GEMM differs between batch sizes only in rare last-bit roundings
        (tests/integration/test_precision.py). Only decode batches of ``dense_from_rows`` rows or more change
        kernel.
        """
        if self.int8_every_forward:
            return Kernel.INT8_GEMM
        if self.dense_from_rows is None:
            return Kernel.WEIGHT_ONLY
        if len(shape) == 3 and shape[1] == 1:
            if shape[0] < self.dense_from_rows:
                return Kernel.WEIGHT_ONLY
            return Kernel.INT8_GEMM if self.int8_gemm else Kernel.DENSE
        return Kernel.DENSE

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel(x.shape)
        if kernel is Kernel.WEIGHT_ONLY and self.matvec is not None and x.dtype == torch.float32:
            return self.matvec(x)  # (..., O) float32, bias included
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)  # (N, K), N = batch x tokens
        if kernel is Kernel.DENSE:
            assert self.dense is not None
            dtype = self.dense.dtype  # the activations' dtype once loaded (apply_precision)
            bias = self.bias if self.bias is None or self.bias.dtype == dtype else self.bias.to(dtype)
            y = torch.nn.functional.linear(flat.to(dtype), self.dense, bias)  # (N, O)
        else:
            if kernel is Kernel.INT8_GEMM:
                y = self.int8_product(flat)  # (N, O) float32
            else:
                y = torch._weight_int8pack_mm(flat.to(WEIGHT_ONLY_DTYPE).contiguous(), self.qweight, self.scales)
            if self.bias is not None:
                y = y + self.bias
        return y.to(x.dtype).reshape(*lead, self.out_features)  # (..., O)

    def int8_product(self, flat: Tensor) -> Tensor:
        """``flat W^T`` by int8 GEMM: the rows (divided by the smoothing, where calibrated) quantized with a
        scale each (:func:`quantize_rows`), the int32 sums scaled back by the row's and the output channel's
        scales.  (N, K) -> (N, O) float32"""
        if self.gemm is not None:  # int8_kernels.c: all of the below in one call, the same numbers
            return self.gemm(flat)
        x = flat.float()  # (N, K)
        weights, scales = self.qweight, self.scales
        if self.smoothing is not None:
            assert self.gemm_qweight is not None
            assert self.gemm_scales is not None
            # times the reciprocals, as the VNNI product does (the same float32 values)
            x, weights, scales = x * (1.0 / self.smoothing), self.gemm_qweight, self.gemm_scales
        q, row_scale = quantize_rows(x)  # (N, K) int8, (N, 1)
        sums = torch._int_mm(q, weights.t())  # (N, O) int32, exact: |sum| <= 127 * 127 * K < 2^31
        return sums.float() * row_scale * scales.float()  # (N, O)

    def smooth(self, smoothing: Tensor) -> None:
        """Calibrate int8 GEMM (SmoothQuant, Xiao et al. 2023): ``x W^T = (x / s) (W diag(s))^T``. Dividing the
        activations by ``s`` channel-wise flattens their outlier channels, which a scale a row would otherwise
        spend its 255 levels on; ``W diag(s)`` is re-quantized (one scale an output channel) for this product
        only. The weight-only kernel and the dense copy keep the unsmoothed weights.  smoothing (K,) > 0"""
        weights = self.dequantized(torch.float32) * smoothing.float()[None, :]  # (O, K)
        self.gemm_qweight, self.gemm_scales = quantize_per_channel(weights)
        self.smoothing = smoothing.float()
        self.bind_kernels(matvec=self.matvec is not None, gemm=self.gemm is not None)  # to the smoothed rows

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"dense_from_rows={self.dense_from_rows}, int8_gemm={self.int8_gemm}, "
            f"int8_every_forward={self.int8_every_forward}, "
            f"kernels={'maskserve' if self.matvec or self.gemm else 'torch'}"
        )


def quantize_int8(model: nn.Module, *, dense_from_rows: int | None = DENSE_FROM_ROWS) -> int:
    """Replace every ``nn.Linear`` of ``model`` by an :class:`Int8Linear`, the (tied) output embeddings
    included; returns how many were replaced. In place."""
    get_head = getattr(model, "get_output_embeddings", None)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.in_features % INT8_K_MULTIPLE == 0:
                setattr(parent, name, Int8Linear.from_linear(child, dense_from_rows=dense_from_rows))
                count += 1
            elif isinstance(child, nn.Linear):
                log.warning("%s (in_features %d) stays a float layer: the int8 kernel needs a multiple of %d",
                            name, child.in_features, INT8_K_MULTIPLE)  # fmt: skip
    config: Any = getattr(model, "config", None)
    if callable(get_head) and isinstance(get_head(), Int8Linear) and getattr(config, "tie_word_embeddings", False):
        # The head is its own int8 module now (the tie is broken): transformers must never re-tie it
        # (``tie_weights``) to the bfloat16 embedding table, which stays for the lookup.
        config.tie_word_embeddings = False
    return count


def apply_precision(
    model: nn.Module,
    precision: Precision,
    *,
    int8_decode_gemm: bool = True,
    int8_every_forward: bool = False,
    int8_kernels_on: bool = True,
    calibration: Callable[[], CalibrationBatch] | None = None,
) -> nn.Module:
    """Cast (and for int8, quantize) a loaded model in place; ``precision`` is resolved (not ``auto``).

    ``int8_decode_gemm``: int8 decode batches of ``DENSE_FROM_ROWS`` rows or more may run int8 GEMM, and do
    where this CPU runs it faster than the dense copy (:func:`int8_gemm_is_faster`). ``int8_every_forward``:
    the model never decodes (fill-mask): every forward runs int8 GEMM where this CPU runs it faster than the
    dense copy at ``FILL_ROWS`` rows, and the copy is dropped; no decode kernel is bound. ``int8_kernels_on``:
    maskserve's kernels (service/engine/int8_kernels.py) where they build here: the float32 product for decode
    steps below ``DENSE_FROM_ROWS`` rows where the activations are float32, the VNNI product for int8 GEMM.
    ``calibration``: the text :func:`calibrate_int8_gemm` smooths int8 GEMM from, where it is chosen; before
    the VNNI product packs its weights, so they are packed once, smoothed."""
    if precision is Precision.AUTO:
        raise ValueError("resolve the precision first (resolve_precision)")
    if precision is Precision.INT8:
        # Quantize from the weights as loaded (float32), then cast the rest (embeddings, norms) to the
        # activations' dtype; ``.to(dtype)`` leaves the int8 buffers as they are.
        count = quantize_int8(model)
    device = next(model.parameters()).device
    dense = activation_dtype(precision, device)
    model.to(dense)
    if precision is Precision.INT8:
        # After the cast (which also cast the scales and the bfloat16 copy): the copy and scales as kernels want.
        cpu = device.type == "cpu"
        own = int8_kernels_on and cpu
        gemm = own and int8_kernels.gemm_available()
        every = int8_every_forward and cpu and int8_gemm_is_faster(dense, gemm, rows=FILL_ROWS)
        decoding = not int8_every_forward
        int8_gemm = decoding and int8_decode_gemm and cpu and int8_gemm_is_faster(dense, gemm)
        matvec = decoding and own and dense == torch.float32 and int8_kernels.matvec_available()
        linears = [module for module in model.modules() if isinstance(module, Int8Linear)]
        for module in linears:
            module.settle_dtypes(dense)
            module.int8_gemm = int8_gemm
        if (int8_gemm or every) and calibration is not None:
            calibrate_int8_gemm(model, calibration())  # on the dense copy, before it is dropped
        for module in linears:
            module.int8_every_forward = every
            if every:
                module.dense = None  # never read: every forward runs int8 GEMM
            module.bind_kernels(matvec=matvec, gemm=gemm and (int8_gemm or every))
        product = "int8 (int8_kernels.c)" if gemm else "int8 (torch._int_mm)"
        if every:
            log.info("int8: %d linear layers quantized; %s GEMM for every forward", count, product)
        else:
            batches = product if int8_gemm else str(dense)
            steps = "int8_kernels.c" if matvec else "_weight_int8pack_mm"
            log.info("int8: %d linear layers quantized; %s GEMM for forwards of many rows, %s GEMM for decode "
                     "batches from %d rows, %s below", count, dense, batches, DENSE_FROM_ROWS, steps)  # fmt: skip
    return model.eval()


@functools.cache
def fastest_dense_dtype() -> torch.dtype:
    """bfloat16 or float32: whichever GEMM this CPU runs faster, for the many-row forwards of the int8 path
    (prefill, fill-mask, decode batches from ``DENSE_FROM_ROWS`` rows). It is bfloat16 on CPUs with AMX or fast
    AVX-512 BF16 GEMM; an Intel Xeon VM without AMX measured bfloat16 GEMM at half float32's rate (bench/
    generate.py's machine line: 145 against 287 GFLOP/s). Timed once per process: (64 x 576) @ (576 x 1536), the
    median of 5 alternated rounds of 10 products each, ~50 ms."""
    x32, w32 = torch.randn(64, 576), torch.randn(1536, 576)
    inputs = {torch.float32: (x32, w32), WEIGHT_ONLY_DTYPE: (x32.to(WEIGHT_ONLY_DTYPE), w32.to(WEIGHT_ONLY_DTYPE))}
    times: dict[torch.dtype, list[float]] = {dtype: [] for dtype in inputs}
    with torch.inference_mode():
        for _ in range(6):  # the first round warms both up and is dropped
            for dtype, (x, w) in inputs.items():
                started = time.perf_counter()
                for _ in range(10):
                    torch.nn.functional.linear(x, w)
                times[dtype].append(time.perf_counter() - started)
    medians = {dtype: statistics.median(t[1:]) for dtype, t in times.items()}
    best = min(medians, key=lambda dtype: medians[dtype])
    log.info("GEMM of 64 rows: %s", ", ".join(f"{d} {t * 1e5:.1f} us" for d, t in medians.items()))
    return best


@functools.cache
def int8_gemm_is_faster(dense: torch.dtype, own_kernel: bool = False, rows: int = 32) -> bool:
    """Whether int8 GEMM (:meth:`Int8Linear.int8_product`, quantizing the rows included; on int8_kernels.c's
    product where ``own_kernel``) beats GEMM on the ``dense`` copy for ``rows`` rows (a decode batch of 32, or
    ``FILL_ROWS``): (rows x 576) @ (576 x 1536), the shape of SmolLM2's gate and up projections, the median of 5
    alternated rounds of 10 products each, ~30 ms at 32 rows, ~0.3 s at 512. Timed once per process and shape."""
    generator = torch.Generator().manual_seed(0)
    lin = Int8Linear(torch.randn(1536, 576, generator=generator) * 0.02, None, dense_from_rows=1, dense_dtype=dense)
    lin.bind_kernels(matvec=False, gemm=own_kernel)
    x = torch.randn(rows, 1, 576, generator=generator).to(dense)  # the activations' dtype
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for _ in range(6):  # the first round warms both up and is dropped
            for gemm, rounds in times.items():
                lin.int8_gemm = gemm
                started = time.perf_counter()
                for _ in range(10):
                    lin(x)
                rounds.append(time.perf_counter() - started)
    medians = {gemm: statistics.median(t[1:]) for gemm, t in times.items()}
    log.info("%d rows: int8 GEMM %.1f us, %s GEMM %.1f us", rows, medians[True] * 1e5, dense,
             medians[False] * 1e5)  # fmt: skip
    return medians[True] < medians[False]


# s = amax^alpha, alpha chosen per input from these: the one whose int8 GEMM comes closest to the dense product
# on the calibration rows (docs/generation.md "Precision": a fixed 0.5 lost 1.5 cloze points on fill-mask).
SMOOTHING_ALPHAS = (0.4, 0.5, 0.6, 0.7, 0.8)
CALIBRATION_ROWS = 256  # rows of each layer's input the choice is measured on (evenly spaced)
CALIBRATION_CHANNELS = 512  # output channels per layer the choice is measured on (evenly spaced): load time


@dataclass(frozen=True)
class CalibrationBatch:
    """Calibration text as one forward: its keyword arguments (``input_ids`` (B, T) right-padded, and the
    masks the model is served with) and which positions are text, (B, T) bool (padding is not calibrated on)."""

    inputs: dict[str, Tensor]
    tokens: Tensor


@torch.inference_mode()
def calibrate_int8_gemm(model: nn.Module, batch: CalibrationBatch) -> int:
    """Smooth the int8 GEMM of every :class:`Int8Linear` of ``model`` from its inputs at the text positions of
    ``batch`` (one forward on the dense path): per input channel, ``s = amax|x|^alpha``, divided by its median
    so the typical channel keeps its scale. Layers that read the same input (q, k and v; gate and up) get the
    same ``s``, so the fused step may stack them; ``alpha`` is chosen for each such input
    (:func:`_smoothing_error`). Returns how many layers were smoothed."""
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    text = batch.tokens.reshape(-1)  # (B * T,)
    amax: dict[int, Tensor] = {}
    rows: dict[int, Tensor] = {}

    def record(module: nn.Module, inputs: tuple[Tensor, ...], _: Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])[text].float()  # (N, K): the text's rows
        amax[id(module)] = x.abs().amax(dim=0)  # (K,)
        rows[id(module)] = x[:: max(1, len(x) // CALIBRATION_ROWS)][:CALIBRATION_ROWS]  # (R, K)

    hooks = [m.register_forward_hook(record) for m in linears]
    try:
        model(**batch.inputs)
    finally:
        for hook in hooks:
            hook.remove()
    inputs: list[tuple[Tensor, list[Int8Linear]]] = []  # (rows (R, K), the layers that read them)
    for module in linears:  # a layer the forward never ran keeps plain int8 GEMM
        if id(module) in rows:
            x = rows[id(module)]
            same = next((layers for seen, layers in inputs if torch.equal(seen, x)), None)
            if same is not None:
                same.append(module)
            else:
                inputs.append((x, [module]))
    for x, layers in inputs:
        # Each output channel has its own weight scale, so channels' errors are independent: a spaced subset
        # of them measures the choice (the LM head has 49152).
        dense = [m.dequantized(torch.float32)[:: max(1, m.out_features // CALIBRATION_CHANNELS)] for m in layers]
        references = [x @ weights.t() for weights in dense]  # (R, O') each
        candidates = [amax[id(layers[0])].clamp(min=1e-5) ** alpha for alpha in SMOOTHING_ALPHAS]  # (K,) each
        candidates = [s / s.median() for s in candidates]
        best = min(candidates, key=lambda s: _smoothing_error(x, dense, references, s))
        for module in layers:
            module.smooth(best)
    return sum(len(layers) for _, layers in inputs)


def _smoothing_error(x: Tensor, dense: Sequence[Tensor], references: Sequence[Tensor], smoothing: Tensor) -> float:
    """How far int8 GEMM smoothed by ``smoothing`` is from the dense products ``references = x dense^T`` on rows
    ``x``: the relative squared error, summed over the layers. x (R, K), dense (O, K) each, smoothing (K,)"""
    q, row_scale = quantize_rows(x * (1.0 / smoothing))  # (R, K) int8, (R, 1)
    error = 0.0
    for weights, reference in zip(dense, references, strict=True):
        smoothed, scales = quantize_per_channel(weights * smoothing[None, :])  # (O, K) int8, (O,)
        y = torch._int_mm(q, smoothed.t()).float() * row_scale * scales.float()  # (R, O)
        error += float(((y - reference) ** 2).sum() / (reference**2).sum().clamp(min=1e-30))
    return error


def decode_step_kernel(model: nn.Module) -> str:
    """What a decode step of fewer than ``DENSE_FROM_ROWS`` rows multiplies by, for ``maskserve info``:
    "int8_matvec" (int8_kernels.c's float32 product), "weight_only" (torch's kernel), or the model's float dtype."""
    linear = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if linear is None:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    return "int8_matvec" if linear.matvec is not None else Kernel.WEIGHT_ONLY.value


def decode_batch_kernel(model: nn.Module) -> str:
    """What a decode batch of ``DENSE_FROM_ROWS`` rows or more multiplies by: "int8_gemm", or the dense dtype
    ("bfloat16", "float32": the model's own for float precisions), for ``maskserve info``."""
    return _kernel_name(model, lambda k: (DENSE_FROM_ROWS, 1, k))


def many_rows_kernel(model: nn.Module) -> str:
    """What a forward of many tokens (prefill, every fill-mask forward) multiplies by, named as
    :func:`decode_batch_kernel` names it."""
    return _kernel_name(model, lambda k: (2, DENSE_FROM_ROWS, k))


def _kernel_name(model: nn.Module, shape: Callable[[int], tuple[int, ...]]) -> str:
    linear = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    if linear is None:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    kernel = linear.kernel(shape(linear.in_features))
    if kernel is Kernel.DENSE and linear.dense is not None:
        return str(linear.dense.dtype).removeprefix("torch.")
    return kernel.value


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's weights, by kind: what /v1/info-style reports and the docs quote."""
    out = {"int8": 0, "int8_gemm": 0, "dense_copy": 0, "other": 0}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Int8Linear):
            out["int8"] += module.qweight.numel() + module.scales.numel() * 2
            out["dense_copy"] += module.dense.numel() * module.dense.element_size() if module.dense is not None else 0
            if module.gemm_qweight is not None and module.gemm_scales is not None:  # the smoothed copy, int8
                out["int8_gemm"] += module.gemm_qweight.numel() + module.gemm_scales.numel() * 2
            seen.update(id(t) for t in module.buffers())
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out["other"] += tensor.numel() * tensor.element_size()
    return out
