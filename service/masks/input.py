"""Input masks: which tokens are hidden from the model, and what replaces them.

Selection strategies (all seeded by an explicit ``torch.Generator``):
- ``token``: a fixed share of the candidate tokens, uniformly;
- ``whole_word``: whole words (all their sub-tokens) until the share is reached (BERT's WWM);
- ``span``: contiguous runs with geometric lengths (SpanBERT, Joshi et al. 2020).

Replacement follows BERT (Devlin et al. 2019): of the selected positions 80% become the mask token, 10% a
random token, 10% stay as they are (``replace_prob`` / ``random_prob`` set the first two shares).
The number selected is exact (``round(ratio * candidates)``, at least one), not Bernoulli, so a given seed
and input always mask the same count.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value the loss skips (torch's cross_entropy default)


class MaskingStrategy(StrEnum):
    TOKEN = "token"
    WHOLE_WORD = "whole_word"
    SPAN = "span"


@dataclass(frozen=True)
class InputMasking:
    ratio: float = 0.15
    strategy: MaskingStrategy = MaskingStrategy.TOKEN
    replace_prob: float = 0.8  # share of selected positions set to the mask token
    random_prob: float = 0.1  # share set to a random token; the rest keep their token
    mean_span: float = 3.0  # span strategy: mean span length in tokens

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError("ratio must be in (0, 1]")
        if self.replace_prob < 0 or self.random_prob < 0 or self.replace_prob + self.random_prob > 1:
            raise ValueError("replace_prob and random_prob must be >= 0 and sum to at most 1")
        if self.mean_span < 1:
            raise ValueError("mean_span must be >= 1")


def _target_count(n_candidates: int, ratio: float) -> int:
    return 0 if n_candidates == 0 else max(1, round(ratio * n_candidates))


def select_tokens(candidates: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Choose ``round(ratio * n)`` candidate positions uniformly.  (T,) bool -> (T,) bool"""
    idx = candidates.nonzero().flatten()  # (N,)
    k = _target_count(len(idx), ratio)
    chosen = idx[torch.randperm(len(idx), generator=generator)[:k]]  # (k,)
    selected = torch.zeros_like(candidates)
    selected[chosen] = True
    return selected


def select_whole_words(candidates: Tensor, word_ids: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Choose whole words until at least ``round(ratio * n)`` tokens are selected.

    ``word_ids`` (T,) long gives each token's word index (-1 for tokens outside any word, e.g. specials);
    only words whose tokens are all candidates are eligible.  -> (T,) bool
    """
    words = [int(w) for w in torch.unique(word_ids[candidates]) if int(w) >= 0]
    eligible = [w for w in words if bool(candidates[word_ids == w].all())]
    k = _target_count(int(candidates.sum()), ratio)
    selected = torch.zeros_like(candidates)
    for i in torch.randperm(len(eligible), generator=generator).tolist():
        if int(selected.sum()) >= k:
            break
        selected |= word_ids == eligible[i]
    return selected


def select_spans(candidates: Tensor, ratio: float, mean_span: float, generator: torch.Generator) -> Tensor:
    """Choose contiguous candidate runs with geometric lengths (mean ``mean_span``) up to the budget.

    (T,) bool -> (T,) bool. Spans are clipped at the budget and never cover non-candidates.
    """
    n = int(candidates.sum())
    k = _target_count(n, ratio)
    selected = torch.zeros_like(candidates)
    p = 1.0 / mean_span
    attempts = 0
    while int(selected.sum()) < k and attempts < 100 * max(k, 1):
        attempts += 1
        free = (candidates & ~selected).nonzero().flatten()  # (F,)
        if len(free) == 0:
            break
        start = int(free[torch.randint(len(free), (1,), generator=generator)])
        u = float(torch.rand((), generator=generator))
        length = 1 + int(torch.log(torch.tensor(1.0 - u)) / torch.log(torch.tensor(1.0 - p))) if p < 1 else 1
        length = min(length, k - int(selected.sum()))
        for pos in range(start, min(start + length, len(candidates))):
            if not bool(candidates[pos]) or bool(selected[pos]):
                break
            selected[pos] = True
    return selected


def select_positions(
    candidates: Tensor,
    masking: InputMasking,
    generator: torch.Generator,
    word_ids: Tensor | None = None,
) -> Tensor:
    """Dispatch on the strategy.  candidates (T,) bool -> selected (T,) bool"""
    if masking.strategy is MaskingStrategy.WHOLE_WORD:
        if word_ids is None:
            raise ValueError("whole_word masking needs word_ids")
        return select_whole_words(candidates, word_ids, masking.ratio, generator)
    if masking.strategy is MaskingStrategy.SPAN:
        return select_spans(candidates, masking.ratio, masking.mean_span, generator)
    return select_tokens(candidates, masking.ratio, generator)


def apply_input_mask(
    input_ids: Tensor,
    selected: Tensor,
    mask_token_id: int,
    vocab_size: int,
    generator: torch.Generator,
    *,
    replace_prob: float = 0.8,
    random_prob: float = 0.1,
    random_token_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace selected tokens (80/10/10 by default); return (masked_ids, labels).

    ``input_ids`` and ``selected`` are (B, T) or (T,); labels hold the original id at selected positions
    and IGNORE_INDEX elsewhere. Random replacements are drawn from ``random_token_ids`` (e.g. the
    non-special vocabulary) or from ``range(vocab_size)``.
    """
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    # Draws happen on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    # One uniform draw per position decides its fate: mask, random token, or kept.
    dev = generator.device
    u = torch.rand(input_ids.shape, generator=generator, device=dev).to(input_ids.device)
    to_mask = selected & (u < replace_prob)
    to_random = selected & (u >= replace_prob) & (u < replace_prob + random_prob)
    if random_token_ids is None:
        random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=dev)
    else:
        pick = torch.randint(len(random_token_ids), input_ids.shape, generator=generator, device=dev)
        random_ids = random_token_ids.to(pick.device)[pick]
    random_ids = random_ids.to(input_ids.device)
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(to_random, random_ids.to(input_ids.dtype), masked)
    return masked, labels
