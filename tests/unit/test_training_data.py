"""Training data: readers, the seeded split, the seeded batch stream, DDP shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.training.data import ChatExample, batch_indices, read_examples, shard, split_indices


def test_read_text_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\n  two  \n")
    assert read_examples(txt, chat=False) == ["one", "two"]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n")
    assert read_examples(jl, chat=False) == ["hello"]


def test_read_chat_pairs_and_messages(tmp_path: Path) -> None:
    jl = tmp_path / "c.jsonl"
    rows = [
        {"prompt": "hi", "response": "hello"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                      {"role": "assistant", "content": "a"}]},
    ]  # fmt: skip
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_examples(jl, chat=True) == [
        ChatExample([{"role": "user", "content": "hi"}], "hello"),
        ChatExample([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "a"),
    ]


@pytest.mark.parametrize(
    ("rows", "message"),
    [([{"prompt": "only"}], "needs 'prompt' and 'response'"),
     ([{"messages": [{"role": "user", "content": "u"}]}], "end with an assistant")],
)  # fmt: skip
def test_read_chat_errors(tmp_path: Path, rows: list[dict[str, object]], message: str) -> None:
    jl = tmp_path / "bad.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=message):
        read_examples(jl, chat=True)


def test_sft_needs_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "a.txt"
    txt.write_text("x\n")
    with pytest.raises(ValueError, match="JSONL"):
        read_examples(txt, chat=True)


def test_split_is_seeded_disjoint_and_complete() -> None:
    train, val = split_indices(100, 0.1, 1000, seed=3)
    assert (train, val) == split_indices(100, 0.1, 1000, seed=3)
    assert len(val) == 10
    assert sorted(train + val) == list(range(100))
    assert split_indices(100, 0.1, 1000, seed=4) != (train, val)
    assert len(split_indices(100, 0.5, 7, seed=0)[1]) == 7  # val_max caps it


def test_batch_stream_is_a_function_of_the_step() -> None:
    n, bs = 10, 3
    epoch0 = [batch_indices(n, bs, 0, s) for s in range(3)]  # 3 full batches per epoch, 1 example dropped
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == 9
    assert batch_indices(n, bs, 0, 1) == epoch0[1]  # resuming at step 1 sees the same batch
    assert batch_indices(n, bs, 0, 3) != epoch0[0]  # the next epoch is reshuffled


def test_shard_splits_a_global_batch() -> None:
    assert shard([5, 6, 7, 8, 9], 0, 2) == [5, 7, 9]
    assert shard([5, 6, 7, 8, 9], 1, 2) == [6, 8]
