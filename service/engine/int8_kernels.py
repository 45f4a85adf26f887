"""maskserve's CPU products for int8 weights (int8_kernels.c), built and loaded at run time.

Two products, both for :class:`~service.engine.precision.Int8Linear`'s decode steps on x86-64 with AVX-512,
both over the very int8 weights and bfloat16 scales it holds:

- :class:`Int8Weights`: float32 rows times int8 weights, for decode steps of a few rows. On a CPU that emulates
  bfloat16 the int8 path's activations are float32 (:func:`service.engine.precision.activation_dtype`), and
  torch's weight-only kernel, vectorised for bfloat16 activations only, cost two casts a call and read the
  weights at about a third of the memory bound.
- :class:`Int8GemmWeights`: int8 rows (a scale each) times int8 weights with AVX-512 VNNI, for decode batches of
  many rows: :meth:`Int8Linear.int8_product`'s numbers exactly (the same integer sums, the same float rescaling)
  without oneDNN's ``torch._int_mm``.

docs/generation.md ("Issue 13's eighth round") measures them. They are C, not a torch extension: no torch
headers, so the system C compiler builds them in under a second, once per process, into a private temporary
directory (nothing is cached on disk that another user could replace). An installation without a compiler at
run time builds them ahead instead, next to this file (``python -m service.engine.int8_kernels``, as the
container image's build stage does): :func:`prebuilt_path` names the library by a digest of the source, so a
stale one is never loaded. Without either (no ``cc`` nor ``$CC``), off x86-64, or on a CPU without the
instructions, ``*_available()`` is False and Int8Linear keeps torch's kernels: slower there, never wrong.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("maskserve.precision")

SOURCE = Path(__file__).with_suffix(".c")
MATVEC_K_MULTIPLE = 16  # the float32 product reads K in vectors of 16 weights
GEMM_K_MULTIPLE = 64  # the VNNI product, of 64
FLAGS = ["-O3", "-shared", "-fPIC", "-fopenmp", "-Wno-psabi"]


def prebuilt_path() -> Path:
    """Where an installation may keep the library built ahead of time (the container image does: it has no
    compiler at run time), named by a digest of the source and flags, so a stale build is never loaded."""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    return SOURCE.with_name(f"int8_kernels-{digest}.so")


def build(target: Path) -> None:
    """Compile int8_kernels.c into ``target`` with the system C compiler. Raises OSError or
    subprocess.SubprocessError (the compiler's output in ``stderr``) where it cannot."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise FileNotFoundError("no C compiler (cc, gcc or $CC)")
    # -fopenmp links libgomp.so.1, which torch has loaded already: the kernels share torch's OpenMP runtime and
    # threads (a second runtime would be a second team of threads on the same cores).
    command = [compiler, *FLAGS, str(SOURCE), "-o", str(target), "-lm"]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)


@functools.cache
def _library() -> ctypes.CDLL | None:
    """int8_kernels.c loaded (prebuilt where installed so, else built now), or None (logged once)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    prebuilt = prebuilt_path()
    if prebuilt.is_file():
        try:
            return ctypes.CDLL(str(prebuilt))
        except OSError as exc:  # unreadable or for another machine: build one instead
            log.warning("int8: cannot load %s (%s); building the kernels", prebuilt, exc)
    with tempfile.TemporaryDirectory(prefix="maskserve-kernels-") as tmp:
        built = Path(tmp) / "int8_kernels.so"
        try:
            build(built)
            return ctypes.CDLL(str(built))  # mapped: it stays loaded once the directory is gone
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or exc
            log.warning("int8: building %s failed (%s); decode steps keep torch's kernels", SOURCE.name, detail)
            return None


def _function(name: str, argtypes: list[type], restype: type | None = None) -> Callable[..., Any] | None:
    """The C function ``name`` where the library built and this CPU runs it (``name``_supported), else None."""
    library = _library()
    if library is None or not getattr(library, f"{name}_supported")():
        return None
    function = getattr(library, name)
    function.argtypes, function.restype = argtypes, restype
    return function


@functools.cache
def _matvec() -> Callable[..., None] | None:
    return _function("maskserve_int8_mm", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int])


@functools.cache
def _gemm() -> tuple[Callable[..., None], Callable[..., int]] | None:
    """(pack, gemm), or None."""
    gemm = _function("maskserve_int8_gemm", [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_int],
                     ctypes.c_int)  # fmt: skip
    library = _library()
    if gemm is None or library is None:
        return None
    pack = library.maskserve_int8_pack
    pack.argtypes, pack.restype = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2, None
    return pack, gemm


def matvec_available() -> bool:
    """Whether :class:`Int8Weights` runs here (builds the library on the first call)."""
    return _matvec() is not None


def gemm_available() -> bool:
    """Whether :class:`Int8GemmWeights` runs here (AVX-512 VNNI; builds the library on the first call)."""
    return _gemm() is not None


def _check_weights(qweight: Tensor, scales: Tensor, k_multiple: int) -> tuple[Tensor, Tensor]:
    """The C code trusts its pointers: refuse every shape and dtype it could misread."""
    if qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
        raise ValueError(f"int8 kernels: qweight {tuple(qweight.shape)}, scales {tuple(scales.shape)} do not fit "
                         "(O, K), (O,)")  # fmt: skip
    if qweight.dtype != torch.int8 or scales.dtype != torch.bfloat16 or qweight.shape[1] % k_multiple:
        raise ValueError(f"int8 kernels take int8 weights, bfloat16 scales and K % {k_multiple} == 0")
    if qweight.device.type != "cpu" or scales.device.type != "cpu":
        raise ValueError("int8 kernels run on CPU tensors only")
    return qweight.contiguous(), scales.contiguous()


def _rows(x: Tensor, features: int, dtype: torch.dtype) -> Tensor:
    if x.shape[-1] != features:
        raise ValueError(f"int8 kernels: input of {x.shape[-1]} features, the weights take {features}")
    if x.dtype != dtype or not x.is_contiguous() or x.device.type != "cpu":
        return x.to("cpu", dtype).contiguous()
    return x


class Int8Weights:
    """One layer's int8 weights bound to the float32 product: ``x -> x (q * scale)^T + bias``.

    Checked once here, so a call costs the kernel and little else (a decode step makes ~120 of them; through a
    module's buffers and checks each call paid ~40 us of Python). It holds its own references to the tensors, so
    the pointers stay valid whatever becomes of the module's buffers; rebind after replacing them.

    qweight (O, K) int8, scales (O,) bfloat16, bias (O,) or None, all on CPU; K % 16 == 0.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        kernel = _matvec()
        if kernel is None:
            raise RuntimeError("the int8 float32 product is not available on this machine (matvec_available())")
        self.kernel = kernel
        self.qweight, self.scales = _check_weights(qweight, scales, MATVEC_K_MULTIPLE)
        if bias is not None and bias.shape != scales.shape:
            raise ValueError(f"int8 kernels: bias {tuple(bias.shape)} does not fit (O,) = {tuple(scales.shape)}")
        self.bias = None if bias is None else bias.to(torch.float32)
        self.out_features, self.in_features = int(qweight.shape[0]), int(qweight.shape[1])
        self.pointers = (self.qweight.data_ptr(), self.scales.data_ptr())

    def __call__(self, x: Tensor) -> Tensor:
        """(..., K) float -> (..., O) float32."""
        x = _rows(x, self.in_features, torch.float32)
        out = torch.empty(*x.shape[:-1], self.out_features, dtype=torch.float32)  # (..., O)
        weights, scales = self.pointers
        self.kernel(x.data_ptr(), weights, scales, out.data_ptr(), x.numel() // self.in_features,
                    self.out_features, self.in_features, torch.get_num_threads())  # fmt: skip
        return out if self.bias is None else out.add_(self.bias)


class Int8GemmWeights:
    """One layer's int8 weights bound to the VNNI product: float32 rows -> :meth:`Int8Linear.int8_product`'s
    output exactly (each row times the reciprocals of ``smoothing`` where given, quantized with its own scale
    as ``quantize_rows`` does, exact int32 sums, ``(sum * row scale) * channel scale``).

    Packs the weights once, for the kernel (16 channels x 4 k a vector): a second int8 copy of them, the same
    size. Rebind after replacing the tensors.

    qweight (O, K) int8, scales (O,) bfloat16, smoothing (K,) float32 or None, on CPU; K % 64 == 0.
    """

    def __init__(self, qweight: Tensor, scales: Tensor, smoothing: Tensor | None) -> None:
        functions = _gemm()
        if functions is None:
            raise RuntimeError("the int8 VNNI product is not available on this machine (gemm_available())")
        pack, self.kernel = functions
        qweight, self.scales = _check_weights(qweight, scales, GEMM_K_MULTIPLE)
        self.out_features, self.in_features = int(qweight.shape[0]), int(qweight.shape[1])
        if smoothing is not None and smoothing.shape != (self.in_features,):
            raise ValueError(f"int8 kernels: smoothing {tuple(smoothing.shape)} does not fit (K,)")
        # The kernel multiplies by the reciprocals, as Int8Linear.int8_product does: the same float32 values.
        self.inv_smoothing = None if smoothing is None else _rows(1.0 / smoothing, self.in_features, torch.float32)
        blocks = -(-self.out_features // 16)
        self.packed = torch.empty(blocks * 16 * self.in_features, dtype=torch.int8)  # (ceil(O/16), K/4, 16, 4)
        pack(qweight.data_ptr(), self.packed.data_ptr(), self.out_features, self.in_features)
        self.qsum = qweight.sum(dim=1, dtype=torch.int32)  # (O,): the kernel's correction for x + 128
        smoothing_pointer = None if self.inv_smoothing is None else self.inv_smoothing.data_ptr()
        self.pointers = (smoothing_pointer, self.packed.data_ptr(), self.qsum.data_ptr(), self.scales.data_ptr())

    def __call__(self, x: Tensor) -> Tensor:
        """(N, K) float -> (N, O) float32."""
        x = _rows(x, self.in_features, torch.float32)
        count = x.numel() // self.in_features
        out = torch.empty(count, self.out_features, dtype=torch.float32)  # (N, O)
        if count == 0:
            return out
        smoothing, packed, sums, scales = self.pointers
        status = self.kernel(x.data_ptr(), smoothing, packed, sums, scales, out.data_ptr(), count,
                             self.out_features, self.in_features, torch.get_num_threads())  # fmt: skip
        if status != 0:
            raise MemoryError("int8 GEMM: no memory for the quantized rows")
        return out


if __name__ == "__main__":  # python -m service.engine.int8_kernels: build ahead of time, next to the source
    build(prebuilt_path())
    print(prebuilt_path())
