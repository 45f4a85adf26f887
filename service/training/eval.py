"""Cloze evaluation: top-1 / top-5 fill-mask accuracy on sentences with one ``[MASK]``.

File format (``service/data/cloze.tsv``): ``category<TAB>sentence<TAB>answer|answer`` (or without the
category column); ``#`` lines are comments. JSONL works too: ``{"text", "answers", "category"?}``.

One scorer (issue 14): each item is a ``POST /v1/fill-mask`` request, turned into a job by the serving code
(``service/api/serving/fill_mask.py``) and searched by the engine (``service/engine/fill/``, run
synchronously by its driver), so an evaluated answer is exactly what the server answers. Two modes:
- ``plain``: ``{"inputs": text, "parameters": {"top_k": 5}}``, the top single sub-tokens at the mask;
- ``whole_word``: ``{"whole_word": true}`` as well: 1..MASKSERVE_MAX_WORD_TOKENS sub-tokens filled as one
  word, ranked by the geometric mean of their probabilities (see ``service/engine/fill/search.py``).

A prediction is the candidate's ``token_str`` without its spaces; answers are compared case-insensitively.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from service.api.protocol.fill_mask import FillMaskParameters, FillMaskRequest
from service.api.serving.fill_mask import fill_mask_job
from service.config import Settings
from service.engine.fill.driver import FillDriver
from service.engine.fill.job import FillCandidate
from service.engine.loading import (
    UNIVERSAL_MASK,
    AdapterObjective,
    LoadedModel,
    ModelKind,
    load_model,
    max_length_of,
)
from service.training.config import BOTH_MODES, EvalMode, FillMaskEvalConfig
from service.training.report import refresh_card

CLOZE_MASK = UNIVERSAL_MASK  # the placeholder every served model accepts
DEFAULT_CLOZE = Path(__file__).resolve().parent.parent / "data" / "cloze.tsv"
TOP_K = 5  # top-5 accuracy needs five candidates
SAMPLED_ANSWERS = 100  # whole-word answers the report shows, so a reader can see they are words
SAMPLE_SEED = 0


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


def cloze_request(item: ClozeItem, mode: EvalMode, top_k: int = TOP_K) -> FillMaskRequest:
    """The item as a client would ask the server for it."""
    parameters = FillMaskParameters(top_k=top_k, whole_word=mode is EvalMode.WHOLE_WORD)
    return FillMaskRequest(inputs=item.text, parameters=parameters)


def predict(
    driver: FillDriver, items: Sequence[ClozeItem], mode: EvalMode, top_k: int = TOP_K
) -> Iterator[list[FillCandidate]]:
    """Each item's ranked candidates, as POST /v1/fill-mask ranks them (the items' jobs search together)."""
    jobs = [fill_mask_job(cloze_request(item, mode, top_k), driver.codec, driver.settings) for item in items]
    for result in driver.run(jobs):
        yield result[0][0]  # one input, one mask


def answer_text(candidate: FillCandidate) -> str:
    """What is compared with the accepted answers: the rendered fill without the space it carries."""
    return candidate.token_str.strip()


def score(items: Sequence[ClozeItem], predictions: Sequence[Sequence[FillCandidate]]) -> dict[str, Any]:
    """Top-1 / top-5 accuracy, per category, and every item's predictions (for inspection)."""
    hits1 = hits5 = 0
    by_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    rows = []
    for item, cands in zip(items, predictions, strict=True):
        preds = [answer_text(c) for c in cands[:TOP_K]]
        answers = {a.lower() for a in item.answers}
        lowered = [p.lower() for p in preds]
        top1 = bool(lowered) and lowered[0] in answers
        top5 = any(p in answers for p in lowered)
        hits1 += top1
        hits5 += top5
        cat = by_cat[item.category or "all"]
        cat[0] += 1
        cat[1] += top1
        cat[2] += top5
        rows.append({"text": item.text, "category": item.category, "answers": list(item.answers),
                     "predictions": preds, "scores": [c.score for c in cands[:TOP_K]], "top1": top1,
                     "top5": top5})  # fmt: skip
    n = max(1, len(items))
    return {
        "top1": hits1 / n,
        "top5": hits5 / n,
        "categories": {c: {"n": v[0], "top1": v[1] / v[0], "top5": v[2] / v[0]} for c, v in sorted(by_cat.items())},
        "items": rows,
    }


def evaluate(driver: FillDriver, items: Sequence[ClozeItem], modes: Sequence[EvalMode]) -> dict[str, Any]:
    """Per mode, :func:`score` of the engine's predictions."""
    result: dict[str, Any] = {"n": len(items)}
    for mode in modes:
        bar = tqdm(predict(driver, items, mode), total=len(items), desc=f"cloze {mode.value}", mininterval=10.0,
                   leave=False)  # fmt: skip
        result[mode.value] = score(items, list(bar))
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


def answer_sample(result: dict[str, Any], n: int = SAMPLED_ANSWERS, seed: int = SAMPLE_SEED) -> str:
    """About ``n`` whole-word answers: the top 5 of items drawn with a fixed seed, one item a line."""
    rows = result[EvalMode.WHOLE_WORD.value]["items"]
    lines, shown = [], 0
    for i in random.Random(seed).sample(range(len(rows)), len(rows)):
        if shown >= n:
            break
        preds = rows[i]["predictions"]
        lines.append(f"  {rows[i]['text']}  ->  {' | '.join(preds)}")
        shown += len(preds)
    return "\n".join([f"{shown} whole-word answers of {len(lines)} items drawn with seed {seed}:", *lines])


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The result without per-item predictions (what a model card keeps)."""
    return {k: ({kk: vv for kk, vv in v.items() if kk != "items"} if isinstance(v, dict) else v)
            for k, v in result.items()}  # fmt: skip


def training_model(
    net: Any, tokenizer: PreTrainedTokenizerBase, kind: ModelKind, mask_token: str, adapter_dir: Path | None
) -> LoadedModel:
    """A model in training, as the engine's fill-mask sees a loaded one (``adapter_dir``: its adapter's
    directory, whose ``maskserve.json`` names the MNTP prefix token; None: the tokenizer's BOS).

    A PEFT model is read through ``get_base_model()``, the transformers model with the LoRA layers injected
    and not merged: ``forward_rows`` calls ``net.base_model`` for hidden states, which on a PeftModel is
    PEFT's LoraModel (its output has logits only). Not merged, because merging would rewrite the training
    model in place (or copy it); unmerged LoRA computes the same function up to rounding. The served model
    differs by the adapter's export dtype only (``--save-dtype``).
    """
    model = net.get_base_model() if hasattr(net, "get_base_model") else net
    param = next(model.parameters())
    return LoadedModel(
        name=str(getattr(model.config, "name_or_path", "")) or "training",
        kind=kind,
        tokenizer=tokenizer,
        device=param.device,
        dtype=param.dtype,
        max_length=max_length_of(tokenizer, model),
        fill_mask_model=model,
        generation_model=None,
        mask_token=mask_token,
        mask_token_id=token_id(tokenizer, mask_token),
        adapter=str(adapter_dir) if adapter_dir is not None else None,
        adapter_objective=AdapterObjective.MNTP if kind is ModelKind.DECODER else None,
    )


def run_cli(settings: Settings, cfg: FillMaskEvalConfig) -> int:
    """``maskserve eval fill-mask``: load the model as served, score the cloze file, print the tables."""
    cloze = cfg.cloze or DEFAULT_CLOZE
    items = read_cloze(Path(cloze))
    if cfg.limit:
        items = items[: cfg.limit]
    modes = list(EvalMode) if cfg.mode == BOTH_MODES else [EvalMode(cfg.mode)]
    if settings.torch_threads:  # on a shared CPU, oversubscribed threads cost far more than they give
        torch.set_num_threads(settings.torch_threads)
    loaded = load_model(settings)
    if loaded.fill_mask_model is None:
        raise ValueError(f"{loaded.name} cannot fill masks (a decoder needs an MNTP adapter)")
    result = evaluate(FillDriver(loaded, settings), items, modes)
    precision = (loaded.fill_mask_precision or loaded.precision).value  # the fill-mask model's
    print(f"model {loaded.name}, adapter {loaded.adapter}, precision {precision}, cloze {cloze}")
    print(summary_table(result))
    print(category_table(result))
    if EvalMode.WHOLE_WORD.value in result:
        print(answer_sample(result))
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
