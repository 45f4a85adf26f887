"""Cloze evaluation: top-1 / top-5 fill-mask accuracy on sentences with one ``[MASK]``.

File format (``service/data/cloze.tsv``): ``category<TAB>sentence<TAB>answer|answer`` (or without the
category column); ``#`` lines are comments. JSONL works too: ``{"text", "answers", "category"?}``.

Two modes:
- ``plain``: ``[MASK]`` becomes one mask token; the top-k tokens at that position, as decoded words;
- ``whole_word``: ``[MASK]`` becomes 1..``max_word_tokens`` mask tokens; for each length a beam search fills
  them left to right with tokens that form one word (a word-start token, then continuations), and the
  candidates of all lengths compete on a length-fair score, the mean log-probability per token.

The convention matches serving: the merged model under a bidirectional 4D mask; with MNTP the logits for
position i are read at i-1 and a prefix token (BOS) starts the sentence; the masked word carries its leading
space (``"The [MASK] barked"`` is ``"The" + mask + " barked"``, the fill is ``" dog"``), as the tokenizer
splits words. Answers are compared case-insensitively.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from service.config import Settings
from service.engine.lexicon import is_word
from service.engine.loading import LoadedModel, load_model, read_adapter_meta
from service.masks.attention import bidirectional_mask, padding_mask, position_ids, to_4d
from service.training.config import BOTH_MODES, EvalMode, FillMaskEvalConfig
from service.training.objectives import decoder_parts
from service.training.report import refresh_card

CLOZE_MASK = "[MASK]"
DEFAULT_CLOZE = Path(__file__).resolve().parent.parent / "data" / "cloze.tsv"
# Word pieces are letters and digits: hyphen and apostrophe pieces would let "sea-muck" or "dog's"
# variants crowd the top 5 with spellings of one guess.
WORD_CHARS = re.compile(r"[A-Za-z0-9]+")


@dataclass(frozen=True)
class ClozeItem:
    text: str
    answers: tuple[str, ...]
    category: str = ""


def read_cloze(path: Path) -> list[ClozeItem]:
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if path.suffix == ".jsonl":
            obj = json.loads(line)
            item = ClozeItem(str(obj["text"]), tuple(str(a) for a in obj["answers"]), str(obj.get("category", "")))
        else:
            cols = line.split("\t")
            if len(cols) not in (2, 3):
                raise ValueError(f"{path}:{n}: expected 'sentence<TAB>answers' or 'category<TAB>sentence<TAB>answers'")
            category = cols[0] if len(cols) == 3 else ""
            item = ClozeItem(cols[-2], tuple(a for a in cols[-1].split("|") if a), category)
        if item.text.count(CLOZE_MASK) != 1 or not item.answers:
            raise ValueError(f"{path}:{n}: needs exactly one {CLOZE_MASK} and at least one answer")
        items.append(item)
    return items


@dataclass
class FillMaskScorer:
    """Scores fills of one ``[MASK]`` with a model that fills masks (encoder, or decoder + MNTP)."""

    model: Any  # a PreTrainedModel or a PeftModel around one
    tokenizer: PreTrainedTokenizerBase
    mask_token_id: int
    mntp: bool  # read position i's logits at i-1, and prepend ``prefix_id``
    prefix_id: int | None = None
    beam: int = 5
    max_word_tokens: int = 4
    length_alpha: float = 0.5  # see rank_words
    words_only: bool = True  # whole-word candidates must pass service/engine/lexicon.py's is_word

    def __post_init__(self) -> None:
        vocab = int(self.model.get_output_embeddings().weight.shape[0])
        tokens = self.tokenizer.convert_ids_to_tokens(list(range(min(vocab, len(self.tokenizer)))))
        special = set(self.tokenizer.all_special_ids) | set(getattr(self.tokenizer, "added_tokens_decoder", {}))
        # WordPiece marks continuations ("##ing"); byte-level BPE / SentencePiece mark word starts ("Ġdog").
        # Count both: a BPE vocabulary may hold a few "##..." tokens (markdown) too.
        marks_start = sum(1 for t in tokens if t and t.startswith(("Ġ", "▁")))
        wordpiece = sum(1 for t in tokens if t and t.startswith("##")) > marks_start
        self._start_space = torch.zeros(vocab, dtype=torch.bool)  # a word start after a space
        self._start_bare = torch.zeros(vocab, dtype=torch.bool)  # a word start with no space (sentence start)
        self._cont = torch.zeros(vocab, dtype=torch.bool)  # continues the word
        self._real = torch.zeros(vocab, dtype=torch.bool)
        for i, tok in enumerate(tokens):
            if i in special or tok is None:
                continue
            self._real[i] = True
            if wordpiece:
                body, spaced, cont = tok.removeprefix("##"), False, tok.startswith("##")
            else:
                spaced = tok.startswith(("Ġ", "▁"))
                body, cont = tok[1:] if spaced else tok, not spaced
            if not WORD_CHARS.fullmatch(body):
                continue
            if cont:
                self._cont[i] = True
            if wordpiece or spaced:
                self._start_space[i] = True
            if wordpiece or not spaced:
                self._start_bare[i] = True

    # -- inputs -------------------------------------------------------------------------------------------
    def _parts(self, text: str) -> tuple[list[int], list[int], bool]:
        left, right = text.split(CLOZE_MASK)
        spaced = left.endswith(" ") or left == ""
        left_ids = list(self.tokenizer(left.rstrip(), add_special_tokens=False)["input_ids"]) if left.strip() else []
        right_ids = list(self.tokenizer(right, add_special_tokens=False)["input_ids"]) if right else []
        return left_ids, right_ids, spaced and bool(left.strip())

    def _wrap(self, ids: list[int]) -> tuple[list[int], int]:
        """Add the prefix (MNTP) or the tokenizer's specials (encoders); returns ids and the offset of ids[0]."""
        if self.mntp:
            return ([self.prefix_id, *ids], 1) if self.prefix_id is not None else (ids, 0)
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        if cls is not None and sep is not None:  # BERT-style [CLS] ... [SEP], as the tokenizer itself adds
            return [int(cls), *ids, int(sep)], 1
        return ids, 0

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]], read_at: list[int]) -> Tensor:
        """Log-probabilities at one position per row (already shifted for MNTP).  -> (N, V)"""
        lengths = [len(r) for r in rows]
        width = max(lengths)
        pad = int(self.tokenizer.pad_token_id or 0)
        device = next(self.model.parameters()).device
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)  # (N, T)
        key = padding_mask(lengths, width, device=device)  # (N, T)
        mask = to_4d(key, bidirectional_mask(width, device=device))  # (N, 1, T, T)
        rows_idx = torch.arange(len(rows), device=device)
        read = torch.tensor(read_at, device=device)
        if self.mntp:  # a decoder: run the LM head at the read positions only (~20% of the compute)
            body, head = decoder_parts(self.model)
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=position_ids(key)).last_hidden_state
            picked = head(hidden[rows_idx, read])  # (N, V)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(key)).logits
            picked = logits[rows_idx, read]  # (N, V)
        return torch.log_softmax(picked.float(), dim=-1).cpu()

    # -- predictions --------------------------------------------------------------------------------------
    def plain(self, text: str, k: int = 5) -> list[str]:
        """The top-k single tokens at the mask, decoded and stripped."""
        left, right, _ = self._parts(text)
        ids, offset = self._wrap([*left, self.mask_token_id, *right])
        pos = offset + len(left) - (1 if self.mntp else 0)
        logp = self._log_probs([ids], [pos])[0].masked_fill(~self._real, float("-inf"))
        return [str(self.tokenizer.decode([int(i)])).strip() for i in logp.topk(k).indices]

    def whole_word(self, text: str, k: int = 5) -> list[tuple[str, float]]:
        """Best whole-word fills over 1..max_word_tokens sub-tokens, by length-fair score (words only)."""
        return self.whole_word_both(text, k)[0]

    def whole_word_both(self, text: str, k: int = 5) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """(the ranked fills that are words, all ranked fills): what the word rule keeps and what it sees."""
        candidates = self.word_candidates(text)
        everything = rank_words(candidates, self.length_alpha)
        if not self.words_only:
            return everything[:k], everything[:k]
        words = rank_words([c for c in candidates if is_word(c[0], pieces=c[2])], self.length_alpha)
        return words[:k], everything[:k]

    def word_candidates(self, text: str) -> list[tuple[str, float, int]]:
        """(word, summed log-probability, sub-tokens) for the final beams of every length.

        One beam search per length n, run side by side: step j fills the j-th mask of every length
        n > j in a single forward.
        """
        left, right, spaced = self._parts(text)
        first_ok = self._start_space if spaced else self._start_bare
        lengths = range(1, self.max_word_tokens + 1)
        beams: dict[int, list[tuple[list[int], float]]] = {n: [([], 0.0)] for n in lengths}
        for j in range(self.max_word_tokens):
            active = [n for n in lengths if n > j and beams[n]]
            rows, reads, owners = [], [], []
            for n in active:
                for b, (fill, _) in enumerate(beams[n]):
                    ids, offset = self._wrap([*left, *fill, *[self.mask_token_id] * (n - j), *right])
                    rows.append(ids)
                    reads.append(offset + len(left) + j - (1 if self.mntp else 0))
                    owners.append((n, b))
            if not rows:
                break
            allowed = first_ok if j == 0 else self._cont
            logp = self._log_probs(rows, reads).masked_fill(~allowed, float("-inf"))  # (rows, V)
            for n in active:
                idx = [r for r, (owner, _) in enumerate(owners) if owner == n]
                prev = beams[n]
                scores = logp[idx] + torch.tensor([s for _, s in prev])[:, None]  # (beams, V)
                top = scores.flatten().topk(self.beam)
                width = scores.shape[1]
                beams[n] = [
                    ([*prev[int(f) // width][0], int(f) % width], float(v))
                    for f, v in zip(top.indices, top.values, strict=True)
                    if v > float("-inf")
                ]
        return [
            (str(self.tokenizer.decode(fill)).strip(), score, n)
            for n in lengths
            for fill, score in beams[n]
            if len(fill) == n
        ]


def rank_words(candidates: list[tuple[str, float, int]], alpha: float) -> list[tuple[str, float]]:
    """Rank words by ``sum log p / n ** alpha`` (alpha 1 = mean per token, 0 = joint probability).

    A word's later pieces are nearly certain once its first is chosen, so the mean (alpha 1) favours long
    words and the sum (alpha 0) short ones; the default sits between (the length penalty of Wu et al.
    2016 serves the same purpose in beam search). Each word keeps its best spelling's score.
    """
    best: dict[str, float] = {}
    for word, total, n in candidates:
        score = total / n**alpha
        if word and score > best.get(word.lower(), float("-inf")):
            best[word.lower()] = score
    return sorted(best.items(), key=lambda kv: -kv[1])


def evaluate(scorer: FillMaskScorer, items: Sequence[ClozeItem], modes: Sequence[EvalMode]) -> dict[str, Any]:
    """Top-1 / top-5 accuracy per mode, per category, and every prediction (for inspection)."""
    result: dict[str, Any] = {"n": len(items)}
    for mode in modes:
        hits1 = hits5 = 0
        by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
        rows = []
        for item in tqdm(items, desc=f"cloze {mode.value}", mininterval=10.0, leave=False):
            unfiltered: list[str] | None = None
            if mode is EvalMode.PLAIN:
                preds = scorer.plain(item.text)
            else:
                kept, seen = scorer.whole_word_both(item.text)
                preds, unfiltered = [w for w, _ in kept], [w for w, _ in seen]
            answers = {a.lower() for a in item.answers}
            lowered = [p.lower() for p in preds]
            top1 = bool(lowered) and lowered[0] in answers
            top5 = any(p in answers for p in lowered[:5])
            hits1 += top1
            hits5 += top5
            cat = by_cat[item.category or "all"]
            cat[0] += 1
            cat[1] += top1
            cat[2] += top5
            rows.append({"text": item.text, "category": item.category, "answers": list(item.answers),
                         "predictions": preds[:5], "top1": top1, "top5": top5})  # fmt: skip
            if unfiltered is not None:
                rows[-1]["before_word_rule"] = unfiltered
        n = max(1, len(items))
        result[mode.value] = {
            "top1": hits1 / n,
            "top5": hits5 / n,
            "categories": {c: {"n": v[0], "top1": v[1] / v[0], "top5": v[2] / v[0]} for c, v in sorted(by_cat.items())},
            "items": rows,
        }
    return result


def summary_table(result: dict[str, Any]) -> str:
    lines = [f"{'mode':<11} {'n':>4} {'top-1':>7} {'top-5':>7}"]
    for mode in EvalMode:
        r = result.get(mode.value)
        if isinstance(r, dict):
            lines.append(f"{mode.value:<11} {result['n']:>4} {r['top1']:>7.1%} {r['top5']:>7.1%}")
    return "\n".join(lines)


def category_table(result: dict[str, Any]) -> str:
    """Per category and mode: n, top-1, top-5."""
    lines = [f"{'mode':<11} {'category':<17} {'n':>4} {'top-1':>7} {'top-5':>7}"]
    for mode in EvalMode:
        r = result.get(mode.value)
        if isinstance(r, dict):
            for cat, c in r["categories"].items():
                lines.append(f"{mode.value:<11} {cat:<17} {c['n']:>4} {c['top1']:>7.1%} {c['top5']:>7.1%}")
    return "\n".join(lines)


def scorer_for(loaded: LoadedModel) -> FillMaskScorer:
    """A scorer for a served model: an encoder, or a decoder with its MNTP adapter merged."""
    if loaded.fill_mask_model is None or loaded.mask_token_id is None:
        raise ValueError(f"{loaded.name} cannot fill masks (a decoder needs an MNTP adapter)")
    prefix_id = None
    if loaded.mntp:
        meta = read_adapter_meta(Path(loaded.adapter)) if loaded.adapter else {}
        prefix = meta.get("prefix_token", loaded.tokenizer.bos_token)
        prefix_id = token_id(loaded.tokenizer, str(prefix)) if prefix else None
    return FillMaskScorer(
        loaded.fill_mask_model, loaded.tokenizer, loaded.mask_token_id, mntp=loaded.mntp, prefix_id=prefix_id
    )


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-item predictions (what a model card keeps)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "items"} if isinstance(v, dict) else v)
            for k, v in result.items()}  # fmt: skip


def run_cli(settings: Settings, cfg: FillMaskEvalConfig) -> int:
    """``maskserve eval fill-mask``: load the model as served, score the cloze file, print the table."""
    cloze = cfg.cloze or DEFAULT_CLOZE
    items = read_cloze(Path(cloze))
    if cfg.limit:
        items = items[: cfg.limit]
    modes = list(EvalMode) if cfg.mode == BOTH_MODES else [EvalMode(cfg.mode)]
    if settings.torch_threads:  # on a shared CPU, oversubscribed threads cost far more than they give
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings)
    result = evaluate(scorer_for(loaded), items, modes)
    print(f"model {loaded.name}, adapter {loaded.adapter}, cloze {cloze}")
    print(summary_table(result))
    print(category_table(result))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2) + "\n")
    if cfg.update_card:
        if loaded.adapter is None or not (Path(loaded.adapter) / "metrics.json").is_file():
            raise ValueError("--update-card needs an adapter directory written by maskserve finetune")
        command = " ".join(["maskserve", *(shlex.quote(a) for a in sys.argv[1:])])
        refresh_card(Path(loaded.adapter), summarize(result), command)
    return 0


def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int)
    return found
