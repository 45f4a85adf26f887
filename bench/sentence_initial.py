"""Why a mask at the start of a sentence fails: the three hypotheses of issue 14, each measured.

    python bench/sentence_initial.py [--adapter DIR|shipped] [--corpus runs/data/mntp.txt]

1. *Attention sink*: the first word is predicted from the prefix (BOS) position. If that position's state
   barely depends on the sentence, the prediction cannot either. Measured: the mean pairwise cosine
   similarity of the final hidden state at the read position across the sentence-initial items (read at
   BOS) and across the mid-sentence items (read at the word before the mask), the number of distinct
   top-1 tokens, and plain top-1 / top-5 with other prefixes: a second BOS, the newline token alone, BOS
   then newline (the sentence-initial state is ``mean cos``: near 1 = the same state whatever the text).
2. *Token family*: at a sentence start the word is a token without a leading space ("Jupiter", not
   " Jupiter"); the bare family holds fewer whole words. Measured: the share of the accepted answers that
   are one sub-token, bare (capitalised, as at a sentence start) and spaced (as mid-sentence); and plain
   accuracy when the answer is allowed in either family.
3. *Which prefix*: for each candidate token (``--prefixes``) read in place of the adapter's prefix, alone and
   after BOS, the same cosine, distinct top-1 and plain hits: how much of the sentence its state carries.
4. *Training rarely masks a first word*: with ``--corpus``, the share of training examples whose first
   word the recipe masks (20% whole-word, as the shipped adapter was trained, and with ``--first-word-prob``)
   and which words those are.

Plain mode throughout (single tokens, the server's tokenizing and vocabulary classes from
service/engine/fill/codec.py, its masks from service/masks/fill.py), on the sentence_initial and
mid_sentence categories of the bundled cloze set.
"""

from __future__ import annotations

import argparse
import collections
from dataclasses import dataclass
from pathlib import Path

import torch

from service.config import load_settings
from service.engine.fill.codec import FillMaskCodec
from service.engine.fill.search import Row
from service.engine.loading import LoadedModel, load_model
from service.masks.fill import fill_attention
from service.masks.input import InputMasking, MaskingStrategy
from service.training.data import chunks
from service.training.eval import CLOZE_MASK, DEFAULT_CLOZE, ClozeItem, read_cloze
from service.training.objectives import MaskedObjective, non_special_ids


@dataclass(frozen=True)
class Probe:
    """The served model and its fill-mask codec (the server's tokenizing, prefix and vocabulary classes)."""

    model: LoadedModel
    codec: FillMaskCodec


@torch.inference_mode()
def read_states(probe: Probe, rows: list[Row]) -> torch.Tensor:
    """Final hidden state at each row's read position.  -> (N, H)

    forward_rows' decoder path (the same padding, 4D mask and position ids from service/masks/fill.py), kept
    here because this bench needs what forward_rows does not return: the states, and full distributions.
    """
    net = probe.model.fill_mask_model
    assert net is not None
    width = max(len(r.ids) for r in rows)
    pad = int(probe.codec.tokenizer.pad_token_id or 0)
    device = probe.model.device
    ids = torch.tensor([[*r.ids, *[pad] * (width - len(r.ids))] for r in rows], device=device)  # (N, T)
    masks = fill_attention([len(r.ids) for r in rows], probe.model.fill_mask_dtype, device)
    hidden = net.base_model(
        input_ids=ids, attention_mask=masks.attention, position_ids=masks.position_ids, use_cache=False
    ).last_hidden_state  # (N, T, H)
    return hidden[torch.arange(len(rows)), torch.tensor([r.reads[0] for r in rows])].cpu()  # (N, H)


@torch.inference_mode()
def log_probs(probe: Probe, rows: list[Row]) -> torch.Tensor:
    """Log-probabilities at each row's read position, over the tokens that may fill a mask.  -> (N, V)"""
    net = probe.model.fill_mask_model
    assert net is not None
    logits = net.get_output_embeddings()(read_states(probe, rows)).float()  # (N, V)
    return torch.log_softmax(logits, dim=-1).masked_fill(~probe.codec.vocab.real, float("-inf"))


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    unit = torch.nn.functional.normalize(states.float(), dim=-1)  # (N, H)
    sim = unit @ unit.T  # (N, N)
    n = len(states)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def row_for(probe: Probe, item: ClozeItem, extra: int = 0, prefix: tuple[int, ...] | None = None) -> Row:
    """The served input (prefix, text with its mask) read where the mask is predicted; ``extra`` more copies
    of the prefix token before it ("+BOS"); ``prefix``: these tokens instead of the adapter's prefix token."""
    inp = probe.codec.encode(item.text, "inputs")
    own = len(probe.codec.prefix_ids)
    ids = inp.ids if prefix is None else (*prefix, *inp.ids[own:])
    shift = 0 if prefix is None else len(prefix) - own
    more = list(probe.codec.prefix_ids[:1]) * extra
    return Row((*more, *ids), (probe.codec.read(inp.slots[0].index + shift + len(more)),))


def answer_ids(probe: Probe, word: str, *, spaced: bool) -> list[int]:
    return list(probe.codec.tokenizer((" " if spaced else "") + word, add_special_tokens=False)["input_ids"])


def capitalised(word: str) -> str:
    return word[:1].upper() + word[1:]


def plain_hits(
    probe: Probe, items: list[ClozeItem], extra: int, prefix: tuple[int, ...] | None = None
) -> tuple[float, float, int]:
    """Plain top-1 / top-5 (decoded token in the answers), and the number of distinct top-1 tokens."""
    logp = log_probs(probe, [row_for(probe, it, extra, prefix) for it in items])  # (N, V)
    hit1 = hit5 = 0
    firsts = set()
    for item, row in zip(items, logp, strict=True):
        top = row.topk(5).indices.tolist()
        words = [probe.codec.decode([i]).strip() for i in top]
        answers = {a.lower() for a in item.answers}
        hit1 += words[0].lower() in answers
        hit5 += any(w.lower() in answers for w in words)
        firsts.add(top[0])
    return hit1 / len(items), hit5 / len(items), len(firsts)


def family_hits(probe: Probe, items: list[ClozeItem]) -> tuple[float, float]:
    """Plain top-1 / top-5 over one-piece answers when the spaced family is read at the first position:
    the rank of the best one-piece answer among all tokens, counting " Jupiter" as well as "Jupiter"."""
    logp = log_probs(probe, [row_for(probe, it) for it in items])  # (N, V)
    hit1 = hit5 = 0
    for item, row in zip(items, logp, strict=True):
        order = row.argsort(descending=True)
        rank = {int(t): r for r, t in enumerate(order[:200].tolist())}
        best = min(
            (
                rank.get(ids[0], 10**6)
                for a in item.answers
                for spaced in (False, True)
                for ids in [answer_ids(probe, capitalised(a), spaced=spaced)]
                if len(ids) == 1
            ),
            default=10**6,
        )
        # the spaced and the bare token of one word share a rank list: count the word once
        hit1 += best == 0
        hit5 += best < 5
    return hit1 / len(items), hit5 / len(items)


def one_piece_share(probe: Probe, items: list[ClozeItem], *, spaced: bool, capital: bool) -> float:
    """Share of items with an accepted answer that is a single sub-token in the given form."""
    ok = sum(
        any(len(answer_ids(probe, capitalised(a) if capital else a, spaced=spaced)) == 1 for a in it.answers)
        for it in items
    )
    return ok / len(items)


def corpus_first_words(probe: Probe, corpus: Path, first_word_prob: float, limit: int) -> None:
    lines = [line.strip() for line in corpus.read_text().splitlines() if line.strip()]
    lines = lines[:: max(1, len(lines) // limit)][:limit]
    tok = probe.codec.tokenizer
    for prob in sorted({0.0, first_word_prob}):
        obj = MaskedObjective(
            tok,
            InputMasking(ratio=0.2, strategy=MaskingStrategy.WHOLE_WORD),
            probe.codec.mask_id,
            non_special_ids(tok, len(tok)),
            max_length=32,
            shift=True,
            prefix_ids=probe.codec.prefix_ids,
            first_word_prob=prob,
        )
        gen = torch.Generator().manual_seed(0)
        masked_first = 0
        words: collections.Counter[str] = collections.Counter()
        all_masked = 0
        encoded = obj.encode(list(lines))
        for idx in chunks(list(range(len(encoded))), 16):
            items = [encoded[i] for i in idx]
            b = obj.collate(items, gen)
            for row, it in enumerate(items):
                n = len(probe.codec.prefix_ids)
                target_at_prefix = int(b.targets[row, n - 1])  # the prefix's last token predicts the first one
                all_masked += int((b.targets[row] >= 0).sum())
                if target_at_prefix >= 0:
                    masked_first += 1
                    words[str(tok.decode([it.ids[n]])).strip()] += 1
        top = ", ".join(f"{w} {c / max(1, masked_first):.0%}" for w, c in words.most_common(6))
        print(
            f"first_word_prob {prob:.2f}: first word masked in {masked_first / len(lines):.1%} of {len(lines)} "
            f"examples ({masked_first / max(1, all_masked):.1%} of all masked tokens); those words: {top}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="shipped")
    parser.add_argument("--corpus", type=Path, help="training sentences: measure how often the first word is masked")
    parser.add_argument("--first-word-prob", type=float, default=0.35)
    parser.add_argument("--corpus-limit", type=int, default=4000)
    parser.add_argument(
        "--prefixes", default='\\n,:,",-,.,and, and, then', help="candidate prefix tokens (\\n: newline)"
    )
    args = parser.parse_args()
    settings = load_settings(adapter=args.adapter)
    model = load_model(settings)
    probe = Probe(model, FillMaskCodec(model, settings))
    items = read_cloze(DEFAULT_CLOZE)
    initial = [it for it in items if it.category == "sentence_initial"]
    mid = [it for it in items if it.category == "mid_sentence"]
    assert all(it.text.startswith(CLOZE_MASK) for it in initial)
    print(f"adapter {args.adapter}; {len(initial)} sentence-initial and {len(mid)} mid-sentence cloze items")

    print("\n1. attention sink: the state the first word is read from")
    print(f"{'items':<18} {'read at':<16} {'mean cos':>8} {'distinct top-1':>14} {'top-1':>7} {'top-5':>7}")
    for name, group in (("sentence_initial", initial), ("mid_sentence", mid)):
        for extra in (0, 1):
            cos = mean_pairwise_cosine(read_states(probe, [row_for(probe, it, extra) for it in group]))
            top1, top5, distinct = plain_hits(probe, group, extra)
            where = ("BOS (pos 0)" if name == "sentence_initial" else "word before") + (" +BOS" if extra else "")
            print(f"{name:<18} {where:<16} {cos:>8.3f} {distinct:>14} {top1:>7.1%} {top5:>7.1%}")

    print("\n2. token family: answers that are one sub-token")
    print(f"{'items':<18} {'bare Capital':>12} {'spaced Capital':>14} {'spaced lower':>12}")
    for name, group in (("sentence_initial", initial), ("mid_sentence", mid)):
        shares = [
            one_piece_share(probe, group, spaced=False, capital=True),
            one_piece_share(probe, group, spaced=True, capital=True),
            one_piece_share(probe, group, spaced=True, capital=False),
        ]
        print(f"{name:<18} {shares[0]:>12.1%} {shares[1]:>14.1%} {shares[2]:>12.1%}")
    t1, t5 = family_hits(probe, initial)
    print(f"sentence_initial, a bare or a spaced token of an answer counts: top-1 {t1:.1%}, top-5 {t5:.1%}")

    print("\n3. other prefix tokens (position 0 alone, and after the tokenizer's BOS), sentence-initial items")
    print(f"{'prefix':<16} {'mean cos':>8} {'distinct top-1':>14} {'top-1':>7} {'top-5':>7}")
    tok = probe.codec.tokenizer
    for text in args.prefixes.split(","):
        text = text.replace("\\n", "\n")
        ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            print(f"{text!r:<16} (not one token)")
            continue
        for prefix in (ids, (int(tok.bos_token_id), *ids)):
            cos = mean_pairwise_cosine(read_states(probe, [row_for(probe, it, prefix=prefix) for it in initial]))
            top1, top5, distinct = plain_hits(probe, initial, 0, prefix)
            name = ("BOS+" if len(prefix) > 1 else "") + repr(text)
            print(f"{name:<16} {cos:>8.3f} {distinct:>14} {top1:>7.1%} {top5:>7.1%}")

    if args.corpus:
        print("\n4. how often training masks the first word (20% whole-word masking, batches of 16)")
        corpus_first_words(probe, args.corpus, args.first_word_prob, args.corpus_limit)


if __name__ == "__main__":
    main()
