"""Every interference experiment's --smoke run (tiny models, seconds), so the scripts in bench/experiments
cannot rot; plus the checks the experiments' own shortcuts rely on."""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
import torch

from bench.experiments import distractors, loss_mask, masking_ratio, output_masks, packing, padding, repetition
from bench.experiments.common import Result, load_decoder
from service.masks.constraints import AttentionConstraints

EXPERIMENTS = [padding, packing, loss_mask, masking_ratio, distractors, output_masks, repetition]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def smoke(smoke_out: Path) -> dict[str, Result]:
    """Each experiment's smoke run, once for the module."""
    return {m.NAME: m.main(["--smoke", "--out", str(smoke_out), "--seed", "3"]) for m in EXPERIMENTS}


@pytest.mark.parametrize("module", EXPERIMENTS, ids=lambda m: m.NAME)
def test_smoke_run_writes_its_table_and_plot(module: ModuleType, smoke: dict[str, Result], smoke_out: Path) -> None:
    result = smoke[module.NAME]
    tmp_path = smoke_out
    assert result.table_path == tmp_path / f"{module.NAME}.md"
    assert result.plot_path == tmp_path / f"{module.NAME}.png"
    written = result.table_path.read_text()
    assert result.table in written
    assert f"python -m bench.experiments.{module.NAME} --smoke --out {tmp_path} --seed 3" in written
    assert result.plot_path.read_bytes()[:8] == PNG_MAGIC
    assert result.table.count("\n") == len(result.rows) + 1  # header, rule, one line per row


# Result.rows holds a table's cells as object; these columns are floats.
def test_padding_mask_makes_batched_equal_unbatched(smoke: dict[str, Result]) -> None:
    rows = {r["variant"]: r for r in smoke[padding.NAME].rows}
    # With the mask (and, on the left, shifted positions) batching changes only float rounding ...
    for label in ("left, mask + shifted positions", "right, mask", "right, no mask"):
        assert cast(float, rows[label]["max_dlogit"]) < 1e-4, label
    # ... without it, left padding is attended to as if it were text.
    assert cast(float, rows["left, no mask"]["max_dlogit"]) > 1e-2


@torch.inference_mode()
def test_shared_prompt_scoring_equals_one_forward_per_candidate() -> None:
    """distractors.score() puts every candidate after one prompt, isolated from each other; that must equal
    scoring each candidate in its own forward, under every condition's constraints."""
    loaded = load_decoder(smoke=True)
    model, tok = loaded.generation_model, loaded.tokenizer
    assert model is not None
    item = distractors.make_items(2, random.Random(1))[1]
    cand_ids = [tok(c, add_special_tokens=False).input_ids for c in item.candidates]
    for cond in distractors.CONDITIONS:
        prompt = distractors.build_prompt(tok, item, cond.with_distractor)
        c = cond.constraints(prompt)
        shared = distractors.score(model, [distractors.layout(prompt.ids, cand_ids, c)], tok.pad_token_id)[0]
        alone = [distractors.score(model, [distractors.layout(prompt.ids, [ids], c)], tok.pad_token_id)[0][0]
                 for ids in cand_ids]  # fmt: skip
        assert shared == pytest.approx(alone, abs=1e-4), cond.label
    # and with no constraint, one candidate alone is what the model gives with its own causal mask
    prompt = distractors.build_prompt(tok, item)
    ids = torch.tensor([prompt.ids + cand_ids[0]])
    logp = model(input_ids=ids).logits[0].log_softmax(-1)
    n = len(prompt.ids)
    plain = sum(float(logp[n - 1 + j, t]) for j, t in enumerate(cand_ids[0]))
    ours = distractors.score(model, [distractors.layout(prompt.ids, cand_ids[:1], AttentionConstraints())], 0)
    assert ours[0][0] == pytest.approx(plain, abs=1e-4)


def test_output_masks_guarantee_the_format(smoke: dict[str, Result]) -> None:
    rows = {(r["task"], r["masked"]): r for r in smoke[output_masks.NAME].rows}
    assert rows["classification", True]["compliance"] == 1.0  # choice: the output is one of the labels


def test_packing_with_the_mask_equals_alone(smoke: dict[str, Result]) -> None:
    for row in smoke[packing.NAME].rows:
        d_pack, d_naive = cast(float, row["d_pack"]), cast(float, row["d_naive"])
        assert d_pack < 1e-4, row["variant"]  # a masked pack changes an example's logits by rounding only
        assert d_naive > 1e-3, row["variant"]  # an unmasked one does not


def test_repetition_mask_leaves_no_repeated_trigram(smoke: dict[str, Result]) -> None:
    rows = {r["condition"]: r for r in smoke[repetition.NAME].rows}
    assert rows["no_repeat_ngram_size=3"]["repeated_3gram_rate"] == 0.0
    assert rows["no_repeat_ngram_size=2"]["repeated_3gram_rate"] == 0.0


def test_repetition_judges() -> None:
    item = repetition.Item("fruits", 5, "List 5 fruits.")
    assert repetition.list_score(item, "1. Apple\n2. Banana\n3. apples\n4. Cherry\n5. Rock") == 3 / 5
    assert repetition.list_score(item, "apple, banana, cherry, pear, plum, mango") == 1.0
    assert repetition.list_score(item, "apple, apple, apple, apple, apple") == 1 / 5
    assert repetition.repeated_ngram_rate([1, 2, 3, 1, 2, 3]) == 1 / 4  # (1,2,3) again; (2,3,1), (3,1,2) new
    assert repetition.repeated_ngram_rate([1, 2]) == 0.0
    assert repetition.distinct_n("a b a b") == 2 / 3
