"""Objectives on the tiny models: exact labels, exact attention masks, packing equivalence, loss masks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from service.masks.input import IGNORE_INDEX as X
from service.masks.input import InputMasking, MaskingStrategy
from service.training.data import ChatExample, Example
from service.training.objectives import (
    LossModule,
    MaskedObjective,
    SftObjective,
    forward_logits,
    non_special_ids,
)
from tests.tiny import token_id


@pytest.fixture(scope="module")
def llama_tok(tiny_llama_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def bert_tok(tiny_bert_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_bert_dir)


def _mntp(tok: PreTrainedTokenizerBase, ratio: float = 0.5, strategy: str = "token") -> MaskedObjective:
    return MaskedObjective(
        tok, InputMasking(ratio=ratio, strategy=MaskingStrategy(strategy), replace_prob=1.0, random_prob=0.0),
        mask_token_id=token_id(tok, "<mask>"), random_token_ids=non_special_ids(tok, len(tok)),
        max_length=32, shift=True, prefix_ids=(tok.bos_token_id,),
    )  # fmt: skip


def test_mntp_labels_are_read_at_the_previous_position(llama_tok: PreTrainedTokenizerBase) -> None:
    obj = _mntp(llama_tok)
    items = obj.encode(["the dog sees the red ball.", "a bird."])
    assert items[0].ids[0] == llama_tok.bos_token_id
    assert items[0].word_ids[0] == -1
    batch = obj.collate(items, torch.Generator().manual_seed(0))
    mask_id = obj.mask_token_id
    for b, it in enumerate(items):
        row = batch.input_ids[b, : len(it.ids)]
        masked = (row == mask_id).nonzero().flatten().tolist()  # replace_prob=1: every selected is <mask>
        assert masked
        assert 0 not in masked
        expected = [X] * batch.targets.shape[1]
        for i in masked:
            expected[i - 1] = it.ids[i]  # masked token i is predicted from the output at i-1
        assert batch.targets[b].tolist() == expected
        unmasked = [i for i in range(len(it.ids)) if i not in masked]
        assert row[unmasked].tolist() == [it.ids[i] for i in unmasked]
    assert batch.weights.tolist() == (batch.targets != X).float().tolist()


def test_mntp_attention_is_bidirectional_over_real_tokens(llama_tok: PreTrainedTokenizerBase) -> None:
    obj = _mntp(llama_tok)
    items = obj.encode(["the dog sees the red ball.", "a bird."])
    batch = obj.collate(items, torch.Generator().manual_seed(0))
    t = batch.input_ids.shape[1]
    n1 = len(items[1].ids)
    assert batch.attention_mask.shape == (2, 1, t, t)
    assert bool(batch.attention_mask[0].all())  # the longest row: every query sees every key
    expected = torch.zeros(t, t, dtype=torch.bool)
    expected[:, :n1] = True  # padding keys are hidden from every query
    assert torch.equal(batch.attention_mask[1, 0], expected)
    assert batch.position_ids[1].tolist() == list(range(n1)) + [0] * (t - n1)


def test_whole_word_masking_masks_every_piece_of_a_word(llama_tok: PreTrainedTokenizerBase) -> None:
    obj = _mntp(llama_tok, ratio=0.01, strategy="whole_word")
    [item] = obj.encode(["unbelievably long words"])
    pieces = [i for i, w in enumerate(item.word_ids) if w == 0]
    assert len(pieces) > 1  # "unbelievably" is several BPE pieces in the tiny vocabulary
    for seed in range(20):
        batch = obj.collate([item], torch.Generator().manual_seed(seed))
        masked = set((batch.input_ids[0] == obj.mask_token_id).nonzero().flatten().tolist())
        word_ids = {item.word_ids[i] for i in masked}
        assert len(word_ids) == 1  # one whole word, all of its pieces
        assert masked == {i for i, w in enumerate(item.word_ids) if w in word_ids}


def test_first_word_prob_masks_the_first_word_in_that_share_of_examples(llama_tok: PreTrainedTokenizerBase) -> None:
    texts = [f"the dog number {i} sees the red ball near the old house today." for i in range(400)]
    for prob, low, high in ((0.0, 0.0, 0.3), (1.0, 1.0, 1.0), (0.5, 0.5, 0.8)):
        obj = _mntp(llama_tok, ratio=0.1, strategy="whole_word")
        obj.first_word_prob = prob
        items = obj.encode(texts)
        first = [i for i, w in enumerate(items[0].word_ids) if w == 0]  # the pieces of "the", after BOS
        assert first[:1] == [1]
        batch = obj.collate(items, torch.Generator().manual_seed(0))
        hit = (batch.input_ids[:, first] == obj.mask_token_id).all(dim=1).float().mean().item()
        assert low <= hit <= high, (prob, hit)
        assert bool((batch.input_ids[:, 0] == llama_tok.bos_token_id).all())  # the prefix is never masked


def test_mlm_labels_stay_in_place(bert_tok: PreTrainedTokenizerBase) -> None:
    obj = MaskedObjective(
        bert_tok, InputMasking(ratio=0.3, replace_prob=1.0, random_prob=0.0), bert_tok.mask_token_id,
        non_special_ids(bert_tok, len(bert_tok)), max_length=32, shift=False,
    )  # fmt: skip
    [item] = obj.encode(["the dog sees the red ball."])
    assert item.ids[0] == bert_tok.cls_token_id
    assert item.ids[-1] == bert_tok.sep_token_id
    batch = obj.collate([item], torch.Generator().manual_seed(1))
    masked = (batch.input_ids[0] == bert_tok.mask_token_id).nonzero().flatten().tolist()
    assert 0 not in masked
    assert len(item.ids) - 1 not in masked
    assert batch.targets[0].tolist() == [item.ids[i] if i in masked else X for i in range(len(item.ids))]


def _sft(tok: PreTrainedTokenizerBase, weight: float, pack: int = 256) -> SftObjective:
    return SftObjective(tok, pack_length=pack, prompt_weight=weight)


# Typed as encode()'s parameter: a list[ChatExample] is not a list[Example] (lists are invariant).
PAIRS: list[Example] = [
    ChatExample([{"role": "user", "content": "the dog sees"}], "the red ball."),
    ChatExample([{"role": "user", "content": "paris is"}], "the capital of france."),
    ChatExample([{"role": "user", "content": "a bird"}], "visits a farmer."),
]


def test_sft_packs_with_block_diagonal_causal_mask(llama_tok: PreTrainedTokenizerBase) -> None:
    obj = _sft(llama_tok, 0.0)
    items = obj.encode(PAIRS[:2])
    n0, n1 = len(items[0].ids), len(items[1].ids)
    batch = obj.collate(items)
    assert batch.input_ids.shape == (1, n0 + n1)  # both in one row, no padding
    assert batch.input_ids[0].tolist() == items[0].ids + items[1].ids
    assert batch.position_ids[0].tolist() == list(range(n0)) + list(range(n1))
    expected = torch.zeros(n0 + n1, n0 + n1, dtype=torch.bool)
    expected[:n0, :n0] = torch.ones(n0, n0).tril().bool()
    expected[n0:, n0:] = torch.ones(n1, n1).tril().bool()
    assert torch.equal(batch.attention_mask[0, 0], expected)
    # targets: next token within the example; the last token of each example predicts nothing
    assert batch.targets[0].tolist() == items[0].ids[1:] + [X] + items[1].ids[1:] + [X]


def test_sft_prompt_tokens_weigh_nothing_at_weight_zero(llama_tok: PreTrainedTokenizerBase) -> None:
    items = _sft(llama_tok, 0.0).encode(PAIRS[:1])
    is_prompt = items[0].is_prompt
    n_prompt = sum(is_prompt)
    assert 0 < n_prompt < len(is_prompt)
    assert is_prompt == sorted(is_prompt, reverse=True)
    w0 = _sft(llama_tok, 0.0).collate(items).weights[0].tolist()
    w_half = _sft(llama_tok, 0.5).collate(items).weights[0].tolist()
    n = len(is_prompt)
    # position t's target is token t+1: prompt targets are tokens 1..n_prompt-1
    assert w0 == [0.0] * (n_prompt - 1) + [1.0] * (n - n_prompt) + [0.0]
    assert w_half == [0.5] * (n_prompt - 1) + [1.0] * (n - n_prompt) + [0.0]


def test_sft_rows_split_at_pack_length(llama_tok: PreTrainedTokenizerBase) -> None:
    items = _sft(llama_tok, 0.0).encode(PAIRS)
    longest_pair = max(len(items[0].ids) + len(items[1].ids), len(items[1].ids) + len(items[2].ids))
    obj = _sft(llama_tok, 0.0, pack=longest_pair - 1)  # no two examples fit together
    assert obj.pack(items) == [[0], [1], [2]]
    batch = obj.collate(items)
    assert batch.input_ids.shape[0] == 3
    assert batch.n_tokens == sum(len(i.ids) for i in items)


def test_packed_logits_equal_unpacked_logits(tiny_llama_dir: Path, llama_tok: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    obj = _sft(llama_tok, 0.0)
    items = obj.encode(PAIRS)
    with torch.no_grad():
        packed = forward_logits(model, obj.collate(items))[0]  # (T, V) all three in one row
        start = 0
        for it in items:
            alone = model(input_ids=torch.tensor([it.ids])).logits[0]  # plain causal, no packing
            torch.testing.assert_close(packed[start : start + len(it.ids)], alone, rtol=1e-5, atol=1e-5)
            start += len(it.ids)


def test_prompt_tokens_contribute_nothing_to_the_loss(tiny_llama_dir: Path, llama_tok: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    loss = LossModule(model, decoder=True)
    items = _sft(llama_tok, 0.0).encode(PAIRS[:2])
    batch = _sft(llama_tok, 0.0).collate(items)
    s, w = loss(batch)
    # by hand: cross-entropy over response targets only
    logits = forward_logits(model, batch)[0]
    keep = batch.weights[0] > 0
    manual = torch.nn.functional.cross_entropy(logits[keep], batch.targets[0][keep])
    torch.testing.assert_close(s / w, manual)
    assert float(w) == sum(not p for it in items for p in it.is_prompt)  # one target per response token
    # changing what a prompt token is supposed to predict changes nothing at weight 0...
    other = batch.targets.clone()
    other[0, 0] = (other[0, 0] + 1) % len(llama_tok)
    s2, _ = loss(type(batch)(batch.input_ids, batch.attention_mask, batch.position_ids, other, batch.weights, 0))
    assert float(s2) == float(s)
    # ...and the prompt counts once its weight is above 0
    full = _sft(llama_tok, 1.0).collate(items)
    s1, w1 = loss(full)
    assert float(w1) > float(w)
    assert float(s1) != float(s)


def test_a_prefix_of_several_tokens_reads_the_first_word_at_its_last_token(
    llama_tok: PreTrainedTokenizerBase,
) -> None:
    prefix = (int(llama_tok.bos_token_id), token_id(llama_tok, "Ġthe"))
    obj = dataclasses.replace(_mntp(llama_tok, ratio=0.01), prefix_ids=prefix, first_word_prob=1.0)
    items = obj.encode(["dogs bark loudly."])
    assert tuple(items[0].ids[:2]) == prefix
    assert items[0].word_ids[:2] == [-1, -1]  # never masked
    batch = obj.collate(items, torch.Generator().manual_seed(0))
    first = items[0].ids[2]
    assert batch.input_ids[0, 2] == obj.mask_token_id  # the first word is masked (first_word_prob 1)
    assert batch.targets[0, 1] == first  # and predicted at the prefix's last token
    assert batch.targets[0, 0] == X  # BOS predicts nothing


def test_space_first_word_writes_a_text_as_if_a_space_came_before_it(llama_tok: PreTrainedTokenizerBase) -> None:
    """The first word becomes the spaced sub-tokens a mid-sentence word has ("Ġdogs", not "dogs"), and the
    whole of it is still one word the first-word masking selects."""
    obj = dataclasses.replace(
        _mntp(llama_tok, ratio=0.01), prefix_ids=(int(llama_tok.bos_token_id),), space_first_word=True
    )
    (item,) = obj.encode(["dogs bark loudly."])
    spaced = llama_tok(" dogs bark loudly.", add_special_tokens=False)["input_ids"]
    assert item.ids == [int(llama_tok.bos_token_id), *spaced]
    assert str(llama_tok.convert_ids_to_tokens(item.ids[1])).startswith("Ġ")
    assert item.word_ids[0] == -1
    assert item.word_ids[1] == 0
    (plain,) = dataclasses.replace(obj, space_first_word=False).encode(["dogs bark loudly."])
    assert not str(llama_tok.convert_ids_to_tokens(plain.ids[1])).startswith("Ġ")
