"""What a generation request asks of the engine, and how it can end: plain data, no torch (the wire models in
``service/api/protocol`` use these names too)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

MAX_TOP_LOGPROBS = 20


class FinishReason(StrEnum):
    LENGTH = "length"  # max_new_tokens reached
    EOS = "eos_token"  # the model ended (an end-of-sequence token)
    STOP = "stop_sequence"  # a stop sequence appeared (it is not part of the text)
    CONSTRAINT = "constraint"  # the output masks together left no token (e.g. a regex that needs a bad word)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    repetition_penalty: float = 1.0  # CTRL's penalty (Keskar et al. 2019), over prompt and output, as transformers
    # OpenAI's additive penalties, over the output only: logit[j] -= c[j] * frequency + (c[j] > 0) * presence
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0  # alternatives reported per token
    n: int = 1  # sequences of the one prompt (prefilled once); sequence i samples with seed + i

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
