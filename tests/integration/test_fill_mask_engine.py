"""service/engine/fill/ on the tiny models: encoding, the three searches against direct model calls,
batch invariance, the MNTP path, and the worker's queue, timeout and cancellation behaviour."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import Tensor
from transformers import PythonBackend, TokenizersBackend, pipeline

from service.config import Settings, load_settings
from service.engine.fill.codec import FillMaskCodec, word_pieces
from service.engine.fill.forward import forward_rows, head_only_matches
from service.engine.fill.job import Candidate, FillInput, FillMaskJob, FillMaskResult
from service.engine.fill.search import RERANK_WEIGHT, Pick, Row, pick
from service.engine.fill.worker import FillMaskWorker
from service.engine.lexicon import load_lexicon
from service.engine.loading import LoadedModel
from service.errors import ClientGone, InvalidRequest, Overloaded, RequestTimeout
from service.masks.constraints import AttentionConstraints, TokenSpan
from tests.tiny import token_id, token_ids


def run_jobs(
    model: LoadedModel, settings: Settings, jobs: Sequence[FillMaskJob], forward: Any = None
) -> list[FillMaskResult]:
    async def main() -> list[FillMaskResult]:
        worker = FillMaskWorker(model, settings, threading.Lock(), forward)
        await worker.start()
        try:
            return list(await asyncio.gather(*(worker.submit(j) for j in jobs)))
        finally:
            await worker.stop()

    return asyncio.run(main())


def reference_logp(model: LoadedModel, ids: Sequence[int], read: int) -> Tensor:
    """Log-probabilities at ``read`` from one unpadded forward, built without service/masks:
    the encoder's default (full) attention, or an all-zero additive 4D mask for MNTP."""
    net = model.fill_mask_model
    assert net is not None
    x = torch.tensor([list(ids)])
    with torch.inference_mode():
        if model.mntp:
            bidirectional = torch.zeros(1, 1, len(ids), len(ids))
            logits = net(input_ids=x, attention_mask=bidirectional).logits
        else:
            logits = net(input_ids=x).logits
    return torch.log_softmax(logits[0, read].float(), dim=-1)


@pytest.fixture(scope="module")
def bert_codec(tiny_bert: LoadedModel, bert_settings: Settings) -> FillMaskCodec:
    return FillMaskCodec(tiny_bert, bert_settings)


@pytest.fixture(scope="module")
def mntp_codec(tiny_mntp: LoadedModel, mntp_settings: Settings) -> FillMaskCodec:
    return FillMaskCodec(tiny_mntp, mntp_settings)


# --- encoding ----------------------------------------------------------------------------------------------


def test_encode_bert_maps_placeholder_and_keeps_specials(bert_codec: FillMaskCodec) -> None:
    inp = bert_codec.encode("The [MASK] sees the red ball.", "inputs")
    tok = bert_codec.tokenizer
    assert tok.convert_ids_to_tokens(list(inp.ids)) == [
        "[CLS]",
        "the",
        "[MASK]",
        "sees",
        "the",
        "red",
        "ball",
        ".",
        "[SEP]",
    ]
    assert [(s.index, s.spaced, s.written) for s in inp.slots] == [(2, True, "[MASK]")]


def test_encode_mntp_prefix_and_space_carried_by_the_mask(mntp_codec: FillMaskCodec) -> None:
    tok = mntp_codec.tokenizer
    inp = mntp_codec.encode("the dog [MASK] the red ball.", "inputs")
    # BOS prefix, no other specials; the space before the mask is the masked word's ("Ġsees"), not a "Ġ" token
    assert tok.convert_ids_to_tokens(list(inp.ids)) == [
        "<|im_start|>",
        "the",
        "Ġdog",
        "<mask>",
        "Ġthe",
        "Ġred",
        "Ġball",
        ".",
    ]
    assert [(s.index, s.spaced) for s in inp.slots] == [(3, True)]
    # the model's own mask token works too, and a mask at the start is not spaced
    own = mntp_codec.encode("<mask> is the largest planet.", "inputs")
    assert [(s.index, s.spaced, s.written) for s in own.slots] == [(1, False, "<mask>")]


def test_encode_errors_name_the_param(bert_codec: FillMaskCodec, mntp_codec: FillMaskCodec) -> None:
    cases = [
        ("", "'inputs[2]' is empty; write [MASK] where the word to predict goes"),
        ("no mask here", "'inputs[2]' has no mask; write [MASK] where the word to predict goes"),
        ("[MASK] " * 9, "'inputs[2]' has 9 masks; at most 8 are allowed (MASKSERVE_MAX_MASKS_PER_INPUT)"),
        ("[MASK]" + " a" * 130, "'inputs[2]' is 133 tokens long; the model takes at most 128"),
    ]
    for text, message in cases:
        with pytest.raises(InvalidRequest) as err:
            bert_codec.encode(text, "inputs[2]")
        assert (err.value.message, err.value.param) == (message, "inputs[2]")
    with pytest.raises(InvalidRequest, match=r"\(or the model's own <mask>\)"):
        mntp_codec.encode("nothing", "inputs")


def test_mntp_mask_at_start_without_prefix_is_refused(tiny_mntp: LoadedModel, mntp_settings: Settings) -> None:
    codec = FillMaskCodec(tiny_mntp, mntp_settings)
    codec.prefix_ids = ()
    with pytest.raises(InvalidRequest, match="starts with a mask, and this model has no prefix token"):
        codec.encode("[MASK] is big.", "inputs")
    assert codec.encode("the dog [MASK].", "inputs").slots[0].index == 2  # no prefix: "the" is at 0


def test_a_prefix_of_several_tokens_comes_before_every_text(
    tiny_mntp: LoadedModel, mntp_settings: Settings, tmp_path: Path
) -> None:
    """maskserve.json's prefix_token may name several tokens (BOS, then a text token the first word is read
    from); they all go before the text, and the first word is read at the last of them."""
    tok = tiny_mntp.tokenizer
    (tmp_path / "maskserve.json").write_text(json.dumps({"prefix_token": f"{tok.bos_token} Ġthe"}))
    model = dataclasses.replace(tiny_mntp, adapter=str(tmp_path))
    codec = FillMaskCodec(model, mntp_settings)
    prefix = (tok.bos_token_id, tok.convert_tokens_to_ids("Ġthe"))
    assert codec.prefix_ids == prefix
    inp = codec.encode("[MASK] is big.", "inputs")
    assert inp.ids[:2] == prefix
    assert inp.slots[0].index == 2
    assert codec.read(inp.slots[0].index) == 1  # MNTP: read at i-1, the prefix's last token
    filled = codec.render(inp, 0, Candidate((token_id(tok, "Ġdog"),), 0.5))
    assert filled.sequence == "dog is big."  # the prefix (a word here) is not part of the client's text


def test_space_first_word_writes_the_first_word_as_mid_sentence(
    tiny_mntp: LoadedModel, mntp_settings: Settings, tmp_path: Path
) -> None:
    """maskserve.json's space_first_word: training put a space before every text, so serving does too: a
    first word is "Ġred" as mid-sentence, a mask there fills a spaced word, and the client's text comes back
    without the space."""
    tok = tiny_mntp.tokenizer
    (tmp_path / "maskserve.json").write_text(json.dumps({"prefix_token": tok.bos_token, "space_first_word": True}))
    codec = FillMaskCodec(dataclasses.replace(tiny_mntp, adapter=str(tmp_path)), mntp_settings)
    word_first = codec.encode("red [MASK] dog.", "inputs")
    assert tok.convert_ids_to_tokens(list(word_first.ids)) == ["<|im_start|>", "Ġred", "<mask>", "Ġdog", "."]
    assert word_first.offsets[1] == (0, 3)  # the added space is no character of the client's text
    mask_first = codec.encode("[MASK] the red ball.", "inputs")
    assert tok.convert_ids_to_tokens(list(mask_first.ids)) == ["<|im_start|>", "<mask>", "Ġthe", "Ġred", "Ġball", "."]
    assert [(s.spaced, s.starts_sentence) for s in mask_first.slots] == [(True, True)]
    filled = codec.render(mask_first, 0, Candidate((token_id(tok, "Ġdog"),), 0.5))
    assert (filled.sequence, filled.token_str) == ("dog the red ball.", "dog")  # as the client's text has it
    again = codec.render(word_first, 0, Candidate((token_id(tok, "Ġball"),), 0.5))
    assert again.sequence == "red ball dog."


def test_a_sentence_start_takes_capitalised_whole_words(mntp_codec: FillMaskCodec) -> None:
    """Whole-word fills at a sentence start begin with a capital letter or a digit (no "the", "his" there);
    elsewhere any word start may."""
    slots = [
        (text, [s.starts_sentence for s in mntp_codec.encode(text, "inputs").slots])
        for text in ["[MASK] is big.", "It rained. [MASK] came out!", "the [MASK] and [MASK].", 'Hi ("[MASK]").']
    ]
    assert slots == [
        ("[MASK] is big.", [True]),
        ("It rained. [MASK] came out!", [True]),
        ("the [MASK] and [MASK].", [False, False]),
        ('Hi ("[MASK]").', [False]),
    ]
    vocab, tok = mntp_codec.vocab, mntp_codec.tokenizer
    logp = torch.zeros(1, len(vocab.real))  # (reads, V): every token equally likely
    picked = pick(logp, Pick("start_bare", 400, capital=True), vocab)
    words = [tok.convert_ids_to_tokens(int(i)) for i, v in zip(picked.ids[0], picked.logp[0], strict=True) if v > -1e9]
    assert "J" in words
    assert all(w[0].isupper() or w[0].isdigit() for w in words)
    assert len(words) < int(vocab.start_bare.sum())  # lower-case starts ("the") are left out


def test_encode_target(bert_codec: FillMaskCodec, mntp_codec: FillMaskCodec) -> None:
    target = mntp_codec.encode_target("Jupiter", "t", 4)
    tok = mntp_codec.tokenizer
    assert tok.convert_ids_to_tokens(list(target.bare)) == ["J", "u", "piter"]
    assert tok.convert_ids_to_tokens(list(target.spaced))[0].startswith("Ġ")
    for word, message in [
        ("new york", "'t': target 'new york' is not a single word"),
        ("  ", "'t': target '  ' is not a single word"),
        ("[MASK]", "'t': target '[MASK]' cannot be written with the model's vocabulary"),
        ("barked", "'t': target 'barked' is 4 sub-tokens; at most 3 (MASKSERVE_MAX_WORD_TOKENS)"),
    ]:
        with pytest.raises(InvalidRequest) as err:
            bert_codec.encode_target(word, "t", 3)
        assert err.value.message == message


def test_word_pieces_wordpiece_and_bpe(bert_codec: FillMaskCodec, mntp_codec: FillMaskCodec) -> None:
    def ids(codec: FillMaskCodec, tokens: list[str]) -> list[int]:
        return token_ids(codec.tokenizer, tokens)

    v = bert_codec.vocab
    start, cont, special, punct = ids(bert_codec, ["the", "##ar", "[MASK]", "."])
    assert (bool(v.real[start]), bool(v.start_spaced[start]), bool(v.start_bare[start]), bool(v.cont[start])) == (
        True, True, True, False,
    )  # fmt: skip
    assert (bool(v.start_spaced[cont]), bool(v.cont[cont])) == (False, True)
    assert not bool(v.real[special])
    assert (bool(v.real[punct]), bool(v.start_spaced[punct]), bool(v.cont[punct])) == (True, False, False)

    b = mntp_codec.vocab
    spaced, bare, mask, dot, space = ids(mntp_codec, ["Ġdog", "piter", "<mask>", ".", "Ġ"])
    assert (bool(b.start_spaced[spaced]), bool(b.start_bare[spaced]), bool(b.cont[spaced])) == (True, False, False)
    assert (bool(b.start_spaced[bare]), bool(b.start_bare[bare]), bool(b.cont[bare])) == (False, True, True)
    assert not bool(b.real[mask])
    assert not bool(b.start_spaced[space] or b.cont[space] or b.cont[dot])
    assert bool(b.real[dot])


def test_word_pieces_sizes_follow_the_model_vocab(tiny_bert: LoadedModel) -> None:
    pieces = word_pieces(tiny_bert.tokenizer, tiny_bert.vocab_size + 10)  # a model padded past the tokenizer
    assert pieces.real.shape == (tiny_bert.vocab_size + 10,)
    assert not bool(pieces.real[-10:].any())


# --- the searches against direct model calls ---------------------------------------------------------------


def test_top_tokens_match_transformers_pipeline(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    text = "The [MASK] sees the red ball."
    codec = FillMaskCodec(tiny_bert, bert_settings)
    (result,) = run_jobs(tiny_bert, bert_settings, [FillMaskJob([codec.encode(text, "inputs")], top_k=5)])
    assert tiny_bert.fill_mask_model is not None
    # LoadedModel holds the tokenizer as the common base class; pipeline() is annotated with its two subclasses
    tokenizer = cast(PythonBackend | TokenizersBackend, tiny_bert.tokenizer)
    pipe = pipeline("fill-mask", model=tiny_bert.fill_mask_model, tokenizer=tokenizer)
    expected = [e for e in pipe(text, top_k=20) if e["token"] not in codec.specials][:5]
    got = result[0][0]
    assert [(c.token, c.token_str, c.sequence) for c in got] == [
        (e["token"], e["token_str"], e["sequence"]) for e in expected
    ]
    assert [c.score for c in got] == pytest.approx([e["score"] for e in expected], abs=1e-6)


def test_targets_are_scored_jointly_by_the_chain_rule(tiny_bert: LoadedModel, tiny_bert_dir: Path) -> None:
    settings = load_settings(model=str(tiny_bert_dir), adapter="none", max_word_tokens=8)
    codec = FillMaskCodec(tiny_bert, settings)
    inp = codec.encode("The [MASK] sees the red ball.", "inputs")
    targets = [codec.encode_target(w, "t", 8) for w in ("barked", "dog")]
    (result,) = run_jobs(tiny_bert, settings, [FillMaskJob([inp], top_k=5, targets=targets)])
    by_word = {c.token_str: c for c in result[0][0]}
    assert set(by_word) == {"barked", "dog"}

    barked = targets[0].spaced  # b ##ar ##k ##ed
    assert codec.tokenizer.convert_ids_to_tokens(list(barked)) == ["b", "##ar", "##k", "##ed"]
    logp = 0.0
    ids = list(inp.ids)
    for j, piece in enumerate(barked):  # fill left to right, the rest still masked (4 masks in all)
        row = ids[:2] + list(barked[:j]) + [codec.mask_id] * (4 - j) + ids[3:]
        logp += float(reference_logp(tiny_bert, row, 2 + j)[piece])
    assert by_word["barked"].score == pytest.approx(math.exp(logp), rel=1e-5)
    assert by_word["barked"].pieces == barked
    assert by_word["barked"].token == barked[0]
    assert by_word["barked"].sequence == "the barked sees the red ball."
    # a one-piece target is its plain probability
    dog = targets[1].spaced[0]
    assert by_word["dog"].score == pytest.approx(math.exp(float(reference_logp(tiny_bert, ids, 2)[dog])), rel=1e-5)
    assert [c.token_str for c in result[0][0]] == ["dog", "barked"]  # ranked by score


def check_whole_words(model: LoadedModel, codec: FillMaskCodec, settings: Settings, text: str, n: int) -> list[Any]:
    """The search itself, every fill of word pieces kept (a tiny random model's fills are rarely words), and
    no rerank (its scores are tested below)."""
    settings = settings.model_copy(update={"whole_word_lexicon": "none", "fill_rerank": False})
    inp = codec.encode(text, "inputs")
    slot = inp.slots[0]
    job = FillMaskJob([inp], top_k=6, whole_word=True, max_word_tokens=n)
    (result,) = run_jobs(model, settings, [job])
    cands = result[0][0]
    assert len(cands) == 6
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)
    assert len({c.token_str for c in cands}) == 6
    first = codec.vocab.start_spaced if slot.spaced else codec.vocab.start_bare
    for c in cands:
        assert 1 <= len(c.pieces) <= n
        assert bool(first[c.pieces[0]])
        assert all(bool(codec.vocab.cont[p]) for p in c.pieces[1:])
        assert c.token_str == codec.decode(c.pieces)
        assert c.score == pytest.approx(geometric_mean(model, codec, inp, c.pieces), rel=1e-5)
    return cands


def geometric_mean(model: LoadedModel, codec: FillMaskCodec, inp: FillInput, pieces: Sequence[int]) -> float:
    """The geometric mean of a fill's chain-rule probabilities, filled left to right (reference forwards)."""
    slot, k, ids = inp.slots[0], len(pieces), list(inp.ids)
    total = 0.0
    for j, piece in enumerate(pieces):
        row = ids[: slot.index] + list(pieces[:j]) + [codec.mask_id] * (k - j) + ids[slot.index + 1 :]
        read = slot.index + j - (1 if model.mntp else 0)
        total += float(reference_logp(model, row, read)[piece])
    return math.exp(total / k)


def reference_sentence_logp(model: LoadedModel, ids: Sequence[int]) -> float:
    """log P(ids[1:] | ids[0]) under the base decoder: one unpadded forward with its own causal mask."""
    net = model.generation_model
    assert net is not None
    with torch.inference_mode():
        logits = net(input_ids=torch.tensor([list(ids)])).logits[0].float()  # (T, V)
    logp = torch.log_softmax(logits[:-1], dim=-1)  # (T - 1, V)
    return float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())


def test_whole_words_are_reranked_by_the_base_decoder(tiny_mntp: LoadedModel, mntp_settings: Settings) -> None:
    settings = mntp_settings.model_copy(update={"whole_word_lexicon": "none", "fill_rerank": True})
    codec = FillMaskCodec(tiny_mntp, settings)
    assert codec.rerank  # a decoder with an MNTP adapter has the base decoder to rerank with
    assert codec.sentence_start is not None
    inp = codec.encode("The [MASK] barked at the mailman.", "inputs")
    (result,) = run_jobs(tiny_mntp, settings, [FillMaskJob([inp], top_k=5, whole_word=True, max_word_tokens=2)])
    got = result[0][0]
    assert len(got) == 5
    index, prefix = inp.slots[0].index, len(codec.prefix_ids)
    joint = []
    for c in got:
        # the client's text with the fill, after the document start: no MNTP prefix, no mask token
        sentence = [codec.sentence_start, *inp.ids[prefix:index], *c.pieces, *inp.ids[index + 1 :]]
        assert codec.mask_id not in sentence
        mntp = math.log(geometric_mean(tiny_mntp, codec, inp, c.pieces))
        joint.append(reference_sentence_logp(tiny_mntp, sentence) + RERANK_WEIGHT * mntp)
    assert joint == sorted(joint, reverse=True)  # ranked by the joint score
    # a score is the candidate's share of the pool: the ratios of two scores are the ratios of their joints
    for c, j in zip(got[1:], joint[1:], strict=True):
        assert c.score / got[0].score == pytest.approx(math.exp(j - joint[0]), rel=1e-4)
    assert sum(c.score for c in got) <= 1 + 1e-9


@pytest.mark.parametrize("text", ["The [MASK] barked at the [MASK].", "The [MASK] barked at the mailman."])
def test_no_rerank_with_two_masks_or_attention_spans(
    text: str, tiny_mntp: LoadedModel, mntp_settings: Settings
) -> None:
    """Two masks: the filled sentence still holds a mask; spans: the base decoder would read an excluded span."""
    settings = mntp_settings.model_copy(update={"whole_word_lexicon": "none", "fill_rerank": True})
    codec = FillMaskCodec(tiny_mntp, settings)
    inp = codec.encode(text, "inputs")
    if len(inp.slots) == 1:
        spans = AttentionConstraints(exclude=(TokenSpan(len(inp.ids) - 3, len(inp.ids) - 1),))
        inp = dataclasses.replace(inp, attention=spans)
    assert not codec.reranks(inp)
    jobs = [FillMaskJob([inp], top_k=4, whole_word=True, max_word_tokens=2) for _ in range(2)]
    on = run_jobs(tiny_mntp, settings, jobs[:1])
    off = run_jobs(tiny_mntp, settings.model_copy(update={"fill_rerank": False}), jobs[1:])
    assert on == off


def test_whole_words_bert(tiny_bert: LoadedModel, bert_settings: Settings, bert_codec: FillMaskCodec) -> None:
    cands = check_whole_words(tiny_bert, bert_codec, bert_settings, "[MASK] is the largest planet.", 3)
    assert max(len(c.pieces) for c in cands) > 1  # multi-piece words compete with single pieces


def test_whole_words_mntp(tiny_mntp: LoadedModel, mntp_settings: Settings, mntp_codec: FillMaskCodec) -> None:
    cands = check_whole_words(tiny_mntp, mntp_codec, mntp_settings, "The [MASK] barked.", 3)
    assert max(len(c.pieces) for c in cands) > 1
    assert all(c.token_str.startswith(" ") for c in cands)  # after a space: word-start pieces carry it
    check_whole_words(tiny_mntp, mntp_codec, mntp_settings, "[MASK] is the largest planet.", 2)


@pytest.mark.parametrize("which", ["bert", "mntp"])
def test_whole_words_keep_only_words_in_the_order_of_the_search(which: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(f"tiny_{which}")
    # the search's own order (a rerank's shares depend on the pool the rule leaves)
    settings: Settings = request.getfixturevalue(f"{which}_settings").model_copy(update={"fill_rerank": False})
    lexicon = load_lexicon(settings.whole_word_lexicon)
    assert lexicon is not None  # the default: english
    codec = FillMaskCodec(model, settings)
    texts = ["the dog [MASK] the ball.", "[MASK] is the largest planet.", "she ate a [MASK] for lunch."]
    jobs = [FillMaskJob([codec.encode(t, "inputs")], top_k=50, whole_word=True, max_word_tokens=2) for t in texts]
    everything = run_jobs(model, settings.model_copy(update={"whole_word_lexicon": "none"}), jobs)
    words = run_jobs(model, settings, jobs)
    kept = 0
    for all_fills, word_fills in zip(everything, words, strict=True):
        uncased = codec.uncased
        expected = [
            c for c in all_fills[0][0] if lexicon.is_word(c.token_str.strip(), pieces=len(c.pieces), uncased=uncased)
        ]
        got = word_fills[0][0]
        assert all(lexicon.is_word(c.token_str.strip(), pieces=len(c.pieces), uncased=uncased) for c in got)
        # the same search, less the non-words: what the top 50 of all fills kept comes first, in order
        assert [(c.token_str, c.score) for c in got[: len(expected)]] == [(c.token_str, c.score) for c in expected]
        kept += len(expected)
        assert len(expected) < len(all_fills[0][0])  # the rule removed something from a random model's fills
    assert kept > 0


def test_multi_mask_sequences_keep_other_masks(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    codec = FillMaskCodec(tiny_bert, bert_settings)
    inp = codec.encode("The [MASK] sees [MASK] red ball.", "inputs")
    (result,) = run_jobs(tiny_bert, bert_settings, [FillMaskJob([inp], top_k=3)])
    # each mask on its own, the other written back as the client wrote it ("##" pieces join their word)
    assert [(c.token_str, c.sequence) for c in result[0][0]] == [
        ("##f", "thef sees [MASK] red ball."),
        ("##u", "theu sees [MASK] red ball."),
        ("likes", "the likes sees [MASK] red ball."),
    ]
    assert [(c.token_str, c.sequence) for c in result[0][1]] == [
        ("##n", "the [MASK] seesn red ball."),
        ("c", "the [MASK] sees c red ball."),
        ("##u", "the [MASK] seesu red ball."),
    ]
    for slot, cands in zip(inp.slots, result[0], strict=True):
        expected = reference_logp(tiny_bert, inp.ids, slot.index)
        assert [c.score for c in cands] == pytest.approx([math.exp(float(expected[c.token])) for c in cands], rel=1e-5)


# --- the forward and batch invariance ----------------------------------------------------------------------


def test_head_only_forward_equals_full_model(tiny_mntp: LoadedModel) -> None:
    assert head_only_matches(tiny_mntp)
    rows = [Row(tuple(range(4, 4 + n)), (0, n - 1)) for n in (3, 7, 5)]
    fast = forward_rows(tiny_mntp, rows)
    full = forward_rows(tiny_mntp, rows, head_only=False)
    for a, b in zip(fast, full, strict=True):
        assert a.shape == (2, tiny_mntp.vocab_size)
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_bert", "tiny_mntp"])
def test_forward_rows_batch_invariance(which: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(which)
    rows = [Row(tuple(range(5, 5 + n)), tuple(range(1, n))) for n in (3, 11, 6, 2, 9)]
    together = forward_rows(model, rows)
    for row, batched in zip(rows, together, strict=True):
        alone = forward_rows(model, [row])[0]
        assert (alone - batched).abs().max().item() <= 1e-5


def spy(model: LoadedModel) -> tuple[list[list[Row]], Any]:
    calls: list[list[Row]] = []

    def forward(rows: Sequence[Row]) -> list[Tensor]:
        calls.append(list(rows))
        return forward_rows(model, rows)

    return calls, forward


@pytest.mark.parametrize("which", ["bert", "mntp"])
def test_worker_batches_mixed_lengths_and_scores_do_not_change(which: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(f"tiny_{which}")
    settings = request.getfixturevalue(f"{which}_settings").model_copy(update={"max_batch_wait_ms": 200})
    codec = FillMaskCodec(model, settings)
    texts = [
        "The [MASK] sees the red ball.",
        "a [MASK] watches the tall mountain and the old house.",
        "[MASK] is the [MASK] of france.",
        "the farmer [MASK].",
    ]
    jobs = [FillMaskJob([codec.encode(t, "inputs")], top_k=5) for t in texts]
    jobs.append(FillMaskJob([codec.encode(texts[0], "inputs")], top_k=4, whole_word=True, max_word_tokens=2))
    calls, forward = spy(model)
    together = run_jobs(model, settings, jobs, forward)
    assert max(len({len(r.ids) for r in call}) for call in calls) > 1  # one forward mixed several lengths
    for job, batched in zip(jobs, together, strict=True):
        (alone,) = run_jobs(model, settings, [job])
        for mask_alone, mask_batched in zip(alone[0], batched[0], strict=True):
            assert [c.pieces for c in mask_alone] == [c.pieces for c in mask_batched]
            for a, b in zip(mask_alone, mask_batched, strict=True):
                assert abs(a.score - b.score) <= 1e-5


# --- MNTP: bidirectional attention, prediction read at i-1 -------------------------------------------------


def test_mntp_sees_tokens_after_the_mask(tiny_mntp: LoadedModel, mntp_codec: FillMaskCodec) -> None:
    a = mntp_codec.encode("the dog [MASK] the red ball.", "inputs")
    b = mntp_codec.encode("the dog [MASK] an apple.", "inputs")
    read = a.slots[0].index - 1
    assert a.ids[: read + 2] == b.ids[: read + 2]  # identical up to and including the mask
    la, lb = forward_rows(tiny_mntp, [Row(a.ids, (read,)), Row(b.ids, (read,))])
    assert (la - lb).abs().max().item() > 1e-3  # what follows the mask changes its prediction
    # the same model under its default causal mask could not tell them apart: the test can fail
    net = tiny_mntp.fill_mask_model
    assert net is not None
    with torch.inference_mode():
        ca = net(input_ids=torch.tensor([a.ids])).logits[0, read]
        cb = net(input_ids=torch.tensor([b.ids])).logits[0, read]
    assert torch.allclose(ca, cb, atol=1e-6)


def test_mntp_reads_the_prediction_at_i_minus_1(tiny_mntp: LoadedModel, mntp_settings: Settings) -> None:
    codec = FillMaskCodec(tiny_mntp, mntp_settings)
    inp = codec.encode("the dog [MASK] the red ball.", "inputs")
    i = inp.slots[0].index
    (result,) = run_jobs(tiny_mntp, mntp_settings, [FillMaskJob([inp], top_k=5)])
    got = result[0][0]
    at_prev = reference_logp(tiny_mntp, inp.ids, i - 1).masked_fill(~codec.vocab.real, float("-inf"))
    at_mask = reference_logp(tiny_mntp, inp.ids, i).masked_fill(~codec.vocab.real, float("-inf"))
    assert [c.token for c in got] == at_prev.topk(5).indices.tolist()
    assert [c.score for c in got] == pytest.approx(at_prev.topk(5).values.exp().tolist(), rel=1e-5)
    assert [c.token for c in got] != at_mask.topk(5).indices.tolist()


def test_mntp_fill_model_is_the_merged_adapter(tiny_mntp: LoadedModel) -> None:
    assert tiny_mntp.mntp
    assert tiny_mntp.mask_token == "<mask>"
    base, merged = tiny_mntp.generation_model, tiny_mntp.fill_mask_model
    assert base is not None
    assert merged is not None
    assert base is not merged
    w_base = base.model.layers[0].self_attn.q_proj.weight
    w_merged = merged.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w_base, w_merged)


# --- the worker: queue bound, timeout, cancellation --------------------------------------------------------


def test_full_queue_is_overloaded(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    settings = bert_settings.model_copy(update={"max_batch_size": 1, "max_queued_requests": 1})
    codec = FillMaskCodec(tiny_bert, settings)
    job = FillMaskJob([codec.encode("the [MASK] sees.", "inputs")], top_k=1)

    async def main() -> list[Any]:
        worker = FillMaskWorker(tiny_bert, settings, threading.Lock())
        await worker.start()
        try:
            return await asyncio.gather(*(worker.submit(job) for _ in range(3)), return_exceptions=True)
        finally:
            await worker.stop()

    first, second, third = asyncio.run(main())
    assert isinstance(first, list)
    assert isinstance(second, list)
    assert isinstance(third, Overloaded)
    assert third.status_code == 429
    assert third.headers() == {"Retry-After": "1"}
    assert third.message == "fill-mask queue is full (2 requests running or waiting); retry shortly"


def test_timeout_then_the_worker_goes_on(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    settings = bert_settings.model_copy(update={"request_timeout_s": 0.3})
    codec = FillMaskCodec(tiny_bert, settings)
    job = FillMaskJob([codec.encode("the [MASK] sees.", "inputs")], top_k=1)
    lock = threading.Lock()

    async def main() -> tuple[RequestTimeout, FillMaskResult]:
        worker = FillMaskWorker(tiny_bert, settings, lock)
        await worker.start()
        lock.acquire()  # a long forward elsewhere (e.g. a decode step) holds the device
        try:
            with pytest.raises(RequestTimeout) as err:
                await worker.submit(job)
        finally:
            lock.release()
        try:
            return err.value, await worker.submit(job)
        finally:
            await worker.stop()

    error, result = asyncio.run(main())
    assert error.message == "fill-mask did not finish within 0.3 s (MASKSERVE_REQUEST_TIMEOUT_S)"
    assert len(result[0][0]) == 1


def test_cancelled_and_gone_requests_are_dropped_before_their_forward(
    tiny_bert: LoadedModel, bert_settings: Settings
) -> None:
    codec = FillMaskCodec(tiny_bert, bert_settings)
    first = FillMaskJob([codec.encode("the dog sees [MASK].", "inputs")], top_k=1)
    cancelled = FillMaskJob([codec.encode("a bird paints [MASK].", "inputs")], top_k=1)
    gone = FillMaskJob([codec.encode("my friend visits [MASK].", "inputs")], top_k=1)
    calls, forward = spy(tiny_bert)
    lock = threading.Lock()

    async def main() -> FillMaskResult:
        worker = FillMaskWorker(tiny_bert, bert_settings, lock, forward)
        await worker.start()
        lock.acquire()
        try:
            running = asyncio.create_task(worker.submit(first))
            await asyncio.sleep(0.2)  # the worker took it and waits for the device
            task = asyncio.create_task(worker.submit(cancelled))
            client_left: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            gone_task = asyncio.create_task(worker.submit(gone, client_gone=lambda: client_left))
            await asyncio.sleep(0.05)
            task.cancel()  # e.g. the server cancelled the handler
            client_left.set_result(None)  # the HTTP client disconnected
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(ClientGone):
                await gone_task
        finally:
            lock.release()
        try:
            result = await running
            await asyncio.sleep(0.1)  # give the worker a round to drop the others
            return result
        finally:
            await worker.stop()

    result = asyncio.run(main())
    assert len(result[0][0]) == 1
    seen = {row.ids for call in calls for row in call}
    assert first.inputs[0].ids in seen
    assert cancelled.inputs[0].ids not in seen
    assert gone.inputs[0].ids not in seen


def test_stop_fails_waiting_requests(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    codec = FillMaskCodec(tiny_bert, bert_settings)
    job = FillMaskJob([codec.encode("the [MASK] sees.", "inputs")], top_k=1)
    lock = threading.Lock()

    async def main() -> Any:
        worker = FillMaskWorker(tiny_bert, bert_settings, lock)
        await worker.start()
        lock.acquire()
        try:
            tasks = [asyncio.create_task(worker.submit(job)) for _ in range(2)]
            await asyncio.sleep(0.1)
            await worker.stop()
            return await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            lock.release()

    outcomes = asyncio.run(main())
    assert [type(o).__name__ for o in outcomes] == ["NotReady", "NotReady"]


def test_a_lone_client_skips_the_batch_window(tiny_bert: LoadedModel, bert_settings: Settings) -> None:
    """Requests that come one at a time do not wait MASKSERVE_MAX_BATCH_WAIT_MS for company that never comes;
    requests that arrive together still share a forward."""
    settings = bert_settings.model_copy(update={"max_batch_wait_ms": 1500})
    codec = FillMaskCodec(tiny_bert, settings)
    sizes: list[int] = []

    def forward(rows: Sequence[Row]) -> list[Tensor]:
        sizes.append(len(rows))
        return forward_rows(tiny_bert, rows)

    def job(text: str) -> FillMaskJob:
        return FillMaskJob([codec.encode(text, "inputs")], top_k=3)

    async def main() -> list[float]:
        worker = FillMaskWorker(tiny_bert, settings, threading.Lock(), forward)
        await worker.start()
        try:
            took = []
            for text in ["the dog [MASK] loudly.", "the cat [MASK] quietly."]:
                start = time.perf_counter()
                await worker.submit(job(text))
                took.append(time.perf_counter() - start)
            await asyncio.gather(*(worker.submit(job(t)) for t in ["a [MASK] b.", "c [MASK] d e.", "[MASK] f."]))
            return took
        finally:
            await worker.stop()

    first, second = asyncio.run(main())
    assert first >= 1.4  # a fresh worker waits its window: concurrent requests may be on their way
    assert second < 1.0  # the last round ran alone: the next request goes at once
    assert sizes[-1] == 3  # queued together, forwarded together
