"""A JSON-schema output mask keeps the schema's property order (xgrammar emits properties in that order;
sorting them changed what the model wrote first — docs/interference.md, experiment 6)."""

from __future__ import annotations

import json

import torch

from service.engine.generate import DecodeBatch, GenerationJob, RunningRequest, compile_job
from service.engine.loading import LoadedModel
from service.engine.params import SamplingParams
from service.engine.vocab import ModelVocab
from service.masks.output import OutputMaskSpec


def test_properties_come_in_the_schema_order(tiny_llama: LoadedModel) -> None:
    vocab = ModelVocab.build(tiny_llama, grammar_cache_size=2)
    schema = {"type": "object", "properties": {"zebra": {"type": "integer"}, "apple": {"type": "integer"}},
              "required": ["zebra", "apple"], "additionalProperties": False}  # fmt: skip
    spec = OutputMaskSpec(json_schema=json.dumps(schema))
    job = GenerationJob(list(tiny_llama.tokenizer("the dog")["input_ids"]), SamplingParams(max_new_tokens=12), spec)
    compile_job(job, vocab, dtype=torch.float32, dims=tiny_llama.attention_dims)
    seq = RunningRequest(job, torch.device("cpu"))
    batch = DecodeBatch.serving(tiny_llama, vocab)
    batch.add([seq])
    while batch.rows:
        batch.step()
    assert seq.result().text.startswith('{"zebra": ')
