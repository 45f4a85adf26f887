"""A fill-mask request as the engine sees it: encoded inputs, their masks (compiled once), the answer types."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from uuid import uuid4

import torch

from service.masks.constraints import AttentionConstraints
from service.masks.fill import FillRowAttention, compile_fill_attention
from service.masks.kinds import MaskKind


@dataclass(frozen=True)
class MaskSlot:
    index: int  # position of the mask token in ``FillInput.ids``
    spaced: bool  # a space preceded the placeholder: the fill carries it (BPE "Ġdog"), as in training
    written: str  # the placeholder as the client wrote it, for the ``sequence`` of other masks' candidates
    starts_sentence: bool = False  # at the text's start or after ". ": a whole word there is capitalised


@dataclass(frozen=True)
class FillInput:
    text: str
    ids: tuple[int, ...]
    slots: tuple[MaskSlot, ...]
    offsets: tuple[tuple[int, int], ...] = ()  # each token's characters in ``text`` ((0, 0): special tokens);
    # empty with a slow tokenizer (no offsets: no attention spans)
    attention: AttentionConstraints | None = None  # in token positions of ``ids``, as the request asked
    compiled: FillRowAttention | None = None  # ``attention`` as tensors, for every width a search gives a mask


@dataclass(frozen=True)
class Target:
    text: str
    spaced: tuple[int, ...]  # sub-tokens after a space
    bare: tuple[int, ...]  # sub-tokens at the start of the text

    def pieces(self, slot: MaskSlot) -> tuple[int, ...]:
        return self.spaced if slot.spaced else self.bare


@dataclass
class FillMaskJob:
    """Engine input: encoded texts (with their attention constraints) and what to predict. Its masks are
    compiled once, when the worker accepts it (:meth:`compile`); reports read them from here."""

    inputs: list[FillInput]
    top_k: int
    targets: list[Target] | None = None
    whole_word: bool = False
    max_word_tokens: int = 1
    batched: bool = False  # ``inputs`` was a list: the response has one entry per input
    rows: int = 0  # its admitted cost: sequences forwarded in all (api/serving/limits.py; 0: not priced)
    request_id: str = field(default_factory=lambda: f"fm-{uuid4().hex}")

    @property
    def output_kind(self) -> MaskKind:
        """Which vocabulary entries may fill a mask."""
        if self.targets is not None:
            return MaskKind.TARGETS
        return MaskKind.WHOLE_WORD if self.whole_word else MaskKind.NO_SPECIAL_TOKENS

    @property
    def mask_kinds(self) -> tuple[MaskKind, ...]:
        """Every kind of mask this job applies (for metrics and reports)."""
        attention = {k for inp in self.inputs if inp.compiled is not None for k in inp.compiled.base.kinds}
        return (MaskKind.MASK_TOKEN, *sorted(attention), self.output_kind)

    def widths(self) -> tuple[int, ...]:
        """How many extra tokens a search may widen a mask by (multi-token targets, whole-word lengths)."""
        if self.targets is not None:
            return tuple(sorted({len(p) - 1 for t in self.targets for p in (t.spaced, t.bare)}))
        return tuple(range(self.max_word_tokens)) if self.whole_word else (0,)

    def compile(self, dtype: torch.dtype, dims: tuple[int, int]) -> None:
        """Compile every input's attention constraints once, for every geometry its searches will ask for.
        ``dims`` (layers, heads) sizes emphasis on chosen layers/heads ((0, 0): the model cannot)."""
        extras = self.widths()
        self.inputs = [
            replace(
                inp,
                compiled=compile_fill_attention(
                    inp.attention, len(inp.ids), [s.index for s in inp.slots], extras, dtype, dims
                ),
            )  # fmt: skip
            if inp.attention is not None and inp.compiled is None
            else inp
            for inp in self.inputs
        ]


@dataclass(frozen=True)
class Candidate:
    pieces: tuple[int, ...]  # the sub-tokens that fill the mask
    score: float


@dataclass(frozen=True)
class FillCandidate:
    """One answer, in the Hugging Face Inference API's terms (``pieces`` feeds the extra ``tokens`` field)."""

    sequence: str
    score: float
    token: int  # the (first) sub-token id
    token_str: str  # the whole fill, decoded
    pieces: tuple[int, ...]


FillMaskResult = list[list[list[FillCandidate]]]  # per input, per mask (in order), ranked candidates
