"""The loaded model's vocabulary as generation needs it: bytes per token, end tokens, grammar compiler."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from service.engine.loading import LoadedModel
from service.masks.output import GrammarCache, Vocabulary


@dataclass
class ModelVocab:
    vocabulary: Vocabulary  # what output masks see
    tokenizer: PreTrainedTokenizerBase
    grammars: GrammarCache
    texts: tuple[str, ...]  # what a token shows in token details (special tokens as written)

    @classmethod
    def build(cls, loaded: LoadedModel, grammar_cache_size: int) -> ModelVocab:
        # A copy of our own: the Rust tokenizer refuses concurrent use while another thread (fill-mask batches)
        # switches its padding or truncation ("Already borrowed").
        tok, size = copy.deepcopy(loaded.tokenizer), loaded.vocab_size
        eos = eos_token_ids(loaded)
        info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=size, stop_token_ids=sorted(eos))
        special = {i for i, t in tok.added_tokens_decoder.items() if t.special and i < size}
        # xgrammar decodes every tokenizer family (byte-level BPE, SentencePiece with byte fallback, ...) to the
        # bytes each token stands for; the output text is exactly the concatenation of those bytes.
        decoded = list(info.decoded_vocab)[:size]
        decoded += [b""] * (size - len(decoded))
        token_bytes = tuple(b"" if i in special else b for i, b in enumerate(decoded))
        texts = tuple(
            str(tok.added_tokens_decoder[i].content) if i in special else b.decode("utf-8", errors="replace")
            for i, b in enumerate(token_bytes)
        )
        vocabulary = Vocabulary(token_bytes=token_bytes, eos_ids=frozenset(eos), special_ids=frozenset(special))
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # our own LRU bounds it
        return cls(vocabulary, tok, GrammarCache(compiler, grammar_cache_size), texts)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """The tokenizer's end-of-sequence token and the generation config's (which may list several)."""
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    model = loaded.generation_model
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif isinstance(config_eos, list):
        ids.update(int(i) for i in config_eos)
    return ids
