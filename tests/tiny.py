"""Tiny models built in-process, so tests need no downloads.

``build_tiny_bert(dir)`` saves a 2-layer BERT masked LM with a WordPiece tokenizer trained here;
``build_tiny_llama(dir)`` saves a 2-layer Llama causal LM with a byte-level BPE tokenizer and a ChatML
chat template (like SmolLM2's). Weights are random under a fixed seed, so outputs are deterministic.
An ``init_std`` above the default gives logits wide enough for a LoRA adapter to lower the loss quickly
(the fine-tuning tests use it).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import cast

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

SUBJECTS = ["the dog", "the cat", "a bird", "my friend", "the teacher", "paris", "the river", "a farmer"]
VERBS = ["sees", "likes", "finds", "carries", "watches", "paints", "follows", "visits"]
OBJECTS = ["the red ball", "a green tree", "the capital", "some bread", "the old house", "a blue car",
           "the tall mountain", "an apple"]  # fmt: skip
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# transformers annotates convert_tokens_to_ids as ``int | list[int]`` whatever it is given; one token gives an
# int and a list of tokens a list of ints.
def token_id(tok: PreTrainedTokenizerBase, token: str) -> int:
    return int(cast(int, tok.convert_tokens_to_ids(token)))


def token_ids(tok: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    return [int(i) for i in cast(list[int], tok.convert_tokens_to_ids(tokens))]


def corpus() -> list[str]:
    """A small, fixed corpus: every subject-verb-object sentence, plus a few longer ones."""
    sentences = [f"{s} {v} {o}." for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]
    sentences += [
        "paris is the capital of france.",
        "jupiter is the largest planet.",
        "unbelievably long words",
    ]
    return sentences


def wordpiece_vocab(specials: list[str]) -> dict[str, int]:
    """A fixed WordPiece vocabulary: specials, single characters and their ``##`` continuations, a few
    suffixes, and every corpus word whole (so unseen words split into several pieces: "barked" -> b ##ar ##k
    ##ed). Written out rather than trained: WordPieceTrainer breaks ties differently from one process to the
    next, which changed the vocabulary, and so every output of the random model, between test sessions."""
    words = sorted({w for s in corpus() for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    chars = sorted({c for w in words for c in w})
    suffixes = ["##ar", "##ed", "##er", "##ing", "##ly"]
    tokens = [*specials, *chars, *(f"##{c}" for c in chars), *suffixes, *words]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}


def build_tiny_bert(path: Path, seed: int = 0, init_std: float = 0.02) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(wordpiece_vocab(specials), unk_token="[UNK]"))
    tok.add_special_tokens(specials)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=fast.pad_token_id, initializer_range=init_std,
    )  # fmt: skip
    model = BertForMaskedLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_tiny_llama(path: Path, seed: int = 0, init_std: float = 0.02) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", model_max_length=256,
    )  # fmt: skip
    fast.chat_template = CHATML
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
        initializer_range=init_std,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_tiny_mntp_adapter(model_dir: Path, path: Path, seed: int = 1) -> Path:
    """A randomly initialised LoRA adapter for the tiny Llama, marked as MNTP (``maskserve.json``).

    ``init_lora_weights=False`` makes B non-zero, so the merged fill-mask copy really differs from the base.
    """
    import json

    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False)  # fmt: skip
    get_peft_model(base, config).save_pretrained(str(path))
    (path / "maskserve.json").write_text(json.dumps({"objective": "mntp", "mask_token": "<mask>"}))
    return path
