"""`maskserve finetune` end to end on the tiny models: each objective learns, the output directory is
servable, --resume continues exactly, and 2 processes train under torchrun (DDP, gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from service.cli import main
from service.config import load_settings
from service.engine.loading import AdapterObjective, load_model
from service.training.config import FinetuneConfig
from service.training.finetune import run
from tests.tiny import build_tiny_bert, build_tiny_llama, corpus

ROOT = Path(__file__).resolve().parents[2]


# With the default init (std 0.02) a frozen tiny LM head bounds the logits near zero, so no adapter can
# lower the loss much; wider random weights leave room to learn.
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama-wide"), init_std=0.3)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("bert-wide"), init_std=0.3)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(corpus()) + "\n")
    return path


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    rows = [{"prompt": s.rsplit(" ", 2)[0], "response": " ".join(s.split()[-2:])} for s in corpus()]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(model: Path, data: Path, out: Path, **kw: object) -> FinetuneConfig:
    base: dict[str, object] = {
        "model": str(model), "data": str(data), "out": str(out), "steps": 30, "batch_size": 8, "lr": 1e-2,
        "warmup_steps": 3, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "eval_every": 10, "save_every": 10,
        "val_max": 16, "max_length": 32, "threads": 1,
    }  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)  # type: ignore[arg-type]


def _val_curve(metrics: dict[str, object]) -> list[float]:
    history = metrics["history"]
    assert isinstance(history, dict)
    return [v for _, v in history["val"]]


def test_mntp_learns_and_is_servable(llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "mntp"
    cloze = tmp_path / "cloze.tsv"
    cloze.write_text("the dog [MASK] the red ball.\tsees\n[MASK] cat likes some bread.\tthe\n")
    cfg = _cfg(llama_dir, text_file, out, objective="mntp", mask_ratio=0.3, cloze=str(cloze))
    metrics = run(cfg)
    # After training, the cloze set through the engine's fill-mask on the PEFT model (training_model)
    assert set(metrics["cloze"]) == {"n", "plain", "whole_word"}
    saved_eval = json.loads((out / "cloze_eval.json").read_text())
    assert [len(r["predictions"]) for r in saved_eval["plain"]["items"]] == [5, 5]
    assert all(0 < len(r["predictions"]) <= 5 for r in saved_eval["whole_word"]["items"])  # words only
    val = _val_curve(metrics)
    assert len(val) == 4
    assert val[-1] < val[0] - 0.5
    assert json.loads((out / "maskserve.json").read_text()) == {
        "objective": "mntp", "mask_token": "<mask>", "prefix_token": "<|im_start|>",
    }  # fmt: skip
    saved = json.loads((out / "finetune_config.json").read_text())
    assert saved == {**asdict(cfg), "objective": "mntp"}
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (out / "README.md").read_text()
    assert "## Reproduce" in card
    assert "Masked token i is predicted from the output at i-1" in card
    weights = load_file(out / "adapter_model.safetensors")
    assert weights
    assert all(t.dtype == torch.float16 for t in weights.values())
    loaded = load_model(load_settings(model=str(llama_dir), adapter=str(out)))
    assert loaded.adapter_objective is AdapterObjective.MNTP
    assert loaded.mntp
    assert loaded.mask_token == "<mask>"
    assert loaded.fill_mask_model is not loaded.generation_model


def test_mlm_learns_on_an_encoder(bert_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlm"
    metrics = run(_cfg(bert_dir, text_file, out, mask_ratio=0.3, mask_strategy="span"))
    val = _val_curve(metrics)
    assert val[-1] < val[0] - 0.5
    assert json.loads((out / "maskserve.json").read_text())["objective"] == "mlm"
    loaded = load_model(load_settings(model=str(bert_dir), adapter=str(out)))
    assert loaded.adapter_objective is AdapterObjective.MLM
    assert loaded.fill_mask_model is not None


def test_sft_learns_and_serves_generation(llama_dir: Path, chat_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    metrics = run(_cfg(llama_dir, chat_file, out, objective="sft", prompt_loss_weight=0.0))
    val = _val_curve(metrics)
    assert val[-1] < val[0] - 0.5
    assert "prompt tokens weighted 0.0" in (out / "README.md").read_text()
    loaded = load_model(load_settings(model=str(llama_dir), adapter=str(out)))
    assert loaded.adapter_objective is AdapterObjective.SFT
    assert loaded.fill_mask_model is None


def test_objective_must_fit_the_model(bert_dir: Path, text_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not fit a encoder model"):
        run(_cfg(bert_dir, text_file, tmp_path / "x", objective="mntp"))


def test_resume_continues_exactly(
    llama_dir: Path, text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw: dict[str, object] = {"steps": 8, "save_every": 4, "eval_every": 4, "lora_dropout": 0.1}
    straight = tmp_path / "straight"
    run(_cfg(llama_dir, text_file, straight, **kw))
    resumed = tmp_path / "resumed"

    def crash(*args: object) -> None:  # the run dies right after writing its step-4 checkpoint
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("service.training.finetune.plot_curve", crash)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(llama_dir, text_file, resumed, **kw))
    assert not (resumed / "adapter_model.safetensors").exists()
    run(_cfg(llama_dir, text_file, resumed, resume=True, **kw))
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    steps = [s for s, _ in json.loads((resumed / "metrics.json").read_text())["history"]["train"]]
    assert steps == list(range(1, 9))


def test_torchrun_two_processes(llama_dir: Path, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "service.cli", "finetune",
        "--model", str(llama_dir), "--data", str(text_file), "--out", str(out), "--steps", "6",
        "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--eval-every", "3", "--save-every", "3",
        "--threads", "1", "--val-max", "8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps_done"] == 6
    assert metrics["command"].startswith("torchrun --nproc_per_node 2 -m service.cli finetune")
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoint" / "state.pt").is_file()


def test_eval_cli_prints_both_modes(bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cloze = tmp_path / "cloze.tsv"
    cloze.write_text("animals\tthe [MASK] sees the red ball.\tdog|cat\n\tparis is the [MASK] of france.\tcapital\n")
    out = tmp_path / "preds.json"
    rc = main(["eval", "fill-mask", "--model", str(bert_dir), "--adapter", "none", "--cloze", str(cloze),
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mode", "n", "top-1", "top-5"]
    assert [line.split()[:2] for line in lines[2:4]] == [["plain", "2"], ["whole_word", "2"]]
    result = json.loads(out.read_text())
    assert result["n"] == 2
    assert len(result["whole_word"]["items"]) == 2
    assert len(result["plain"]["items"][0]["predictions"]) == 5
