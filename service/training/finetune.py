"""``maskserve finetune``: LoRA fine-tuning with input, attention and loss masks (mlm, mntp, sft).

    # the shipped fill-mask adapter (decoder + MNTP); see docs/finetune.md for the exact command
    python scripts/mntp_corpus.py --out runs/data/mntp.txt
    maskserve finetune --data runs/data/mntp.txt --objective mntp --out runs/mntp --steps 1500

    # an encoder, masked LM; a chat model, prompt/response pairs (prompt tokens masked out of the loss)
    maskserve finetune --model path/to/bert --data text.txt --objective mlm --out runs/mlm
    maskserve finetune --model bundled --data pairs.jsonl --objective sft --prompt-loss-weight 0 --out runs/sft

    # several processes (DDP: gloo on CPU, nccl on GPU); the global batch is batch_size x processes
    torchrun --nproc_per_node 2 -m service.cli finetune --data ... --out ...

    # continue an interrupted run from its last checkpoint
    maskserve finetune ... --out runs/mntp --resume

The output directory is a PEFT adapter that ``maskserve serve --model … --adapter OUT`` hosts directly
(``maskserve.json`` tells the loader the objective and mask token), with ``README.md`` (the model card),
``training_curve.png``, ``finetune_config.json`` (every resolved setting), ``metrics.json`` and
``checkpoint/`` (for ``--resume``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from service.config import BUNDLED_MODEL, load_settings
from service.engine.loading import (
    ADAPTER_META,
    ModelKind,
    bundled_model_dir,
    choose_mntp_mask_token,
    detect_kind,
)
from service.training.config import CONFIG_FILE, FinetuneConfig, Objective
from service.training.data import batch_indices, chunks, read_examples, shard, split_indices
from service.training.eval import token_id
from service.training.objectives import (
    Batch,
    Encoded,
    LossModule,
    MaskedObjective,
    SftObjective,
    non_special_ids,
)
from service.training.report import model_card, plot_curve, write_json

CHECKPOINT = "checkpoint/state.pt"
OBJECTIVE_DOC = {
    Objective.MLM: "masked language modelling: each masked token is predicted at its own position",
    Objective.MNTP: "masked next-token prediction under a bidirectional attention mask (LLM2Vec, "
    "BehnamGhader et al. 2024)",
    Objective.SFT: "supervised fine-tuning on prompt/response pairs, packed without padding",
}


# --- distributed ---------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if world == 1:
        return Dist(0, 1, device)
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, device)


# --- the run -------------------------------------------------------------------------------------------


def _lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model_dir(model: str) -> Path:
    if model == BUNDLED_MODEL:
        return bundled_model_dir(load_settings(adapter="none").cache_dir)
    return Path(model)


def _command() -> str:
    argv = sys.argv[1:]  # "finetune ..." whether started as `maskserve` or `python -m service.cli`
    prefix = "maskserve" if os.environ.get("WORLD_SIZE", "1") == "1" else (
        f"torchrun --nproc_per_node {os.environ['WORLD_SIZE']} -m service.cli"
    )  # fmt: skip
    return " ".join([prefix, *(shlex.quote(a) for a in argv)])


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, validate, checkpoint; write the adapter, card and curve. Returns the metrics (rank 0)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    out = Path(cfg.out)
    if cfg.resume:
        saved = json.loads((out / CONFIG_FILE).read_text())
        keep = {"steps": cfg.steps, "resume": True, "threads": cfg.threads}  # what a resume may change
        cfg = FinetuneConfig(**{**saved, **keep})
    if not cfg.data:
        raise ValueError("--data is required")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    env = init_distributed()
    torch.manual_seed(cfg.seed)

    model_dir = _model_dir(cfg.model)
    kind = detect_kind(model_dir)
    objective = Objective(cfg.objective) if cfg.objective != "auto" else (
        Objective.MLM if kind is ModelKind.ENCODER else Objective.MNTP
    )  # fmt: skip
    if (objective is Objective.MLM) != (kind is ModelKind.ENCODER):
        raise ValueError(f"objective {objective} does not fit a {kind} model (mlm: encoders; mntp, sft: decoders)")
    cfg = dataclasses.replace(cfg, objective=objective.value)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is always masked; any id serves
    auto = AutoModelForMaskedLM if kind is ModelKind.ENCODER else AutoModelForCausalLM
    base = auto.from_pretrained(model_dir, dtype=torch.float32)
    vocab = int(base.get_output_embeddings().weight.shape[0])

    meta: dict[str, Any] = {"objective": objective.value}
    obj: MaskedObjective | SftObjective
    if objective is Objective.SFT:
        obj = SftObjective(tokenizer, cfg.pack_length, cfg.prompt_loss_weight)
    else:
        mask_token = choose_mntp_mask_token(tokenizer)
        prefix = (cfg.prefix_token or tokenizer.bos_token) if objective is Objective.MNTP else None
        if objective is Objective.MNTP and prefix is None:
            raise ValueError("mntp needs a tokenizer with a BOS token to prefix each sentence")
        for token in (prefix or "").split():
            if token not in tokenizer.get_vocab():
                raise ValueError(f"--prefix-token: {token!r} is not a token of the vocabulary")
        meta.update(mask_token=mask_token, prefix_token=prefix)
        if cfg.space_first_word:
            meta.update(space_first_word=True)
        obj = MaskedObjective(
            tokenizer, cfg.masking(), token_id(tokenizer, mask_token),
            non_special_ids(tokenizer, vocab), cfg.max_length, shift=objective is Objective.MNTP,
            prefix_ids=tuple(token_id(tokenizer, t) for t in (prefix or "").split()),
            first_word_prob=cfg.first_word_prob, space_first_word=cfg.space_first_word,
        )  # fmt: skip

    examples = read_examples(Path(cfg.data), chat=objective is Objective.SFT)
    train_idx, val_idx = split_indices(len(examples), cfg.val_fraction, cfg.val_max, cfg.seed)
    train: list[Encoded] = obj.encode([examples[i] for i in train_idx])
    val: list[Encoded] = obj.encode([examples[i] for i in val_idx])
    lengths = [len(e.ids) for e in train]

    targets: str | list[str] = cfg.lora_targets if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets)
    model = get_peft_model(base, lora).to(env.device)
    if cfg.init_adapter and not cfg.resume:  # start from a trained adapter of the same shape (a checkpoint resumes)
        from safetensors.torch import load_file

        init = load_file(str(Path(cfg.init_adapter) / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, {k: v.float() for k, v in init.items()})
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_module = LossModule(model, decoder=kind is ModelKind.DECODER)
    ddp: nn.Module = loss_module
    if env.world > 1:
        ddp = nn.parallel.DistributedDataParallel(loss_module, device_ids=[env.device.index] if env.device.index
                                                  is not None else None)  # fmt: skip
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))

    history: dict[str, list[list[float]]] = {"train": [], "val": []}
    start_step, trained_seconds, tokens_seen = 0, 0.0, 0
    command = _command()  # what reproduces the run: the first command, not a later --resume
    ckpt_path = out / CHECKPOINT
    if cfg.resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(model, state["adapter"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = int(state["step"]), state["history"]
        trained_seconds, tokens_seen = float(state["seconds"]), int(state["tokens"])
        torch.set_rng_state(state["rng"])  # LoRA dropout draws from it
        command = str(state.get("command", command))
    if env.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, asdict(cfg))

    def validate() -> float:
        model.eval()
        total = weight = 0.0
        gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same masks at every validation
        with torch.no_grad(), _autocast(cfg, env):
            for idx in chunks(list(range(len(val))), cfg.batch_size):
                batch = obj.collate([val[i] for i in idx], gen).to(env.device)
                s, w = loss_module(batch)
                total, weight = total + float(s), weight + float(w)
        model.train()
        return total / max(weight, 1e-8)

    global_batch = cfg.batch_size * env.world
    bar = tqdm(total=cfg.steps, initial=start_step, disable=not env.main, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0, desc=f"{objective.value}")  # fmt: skip
    if env.main and start_step == 0 and cfg.eval_every:
        history["val"].append([0, validate()])  # where the curve starts
    model.train()
    tic = time.perf_counter()
    step = start_step
    for step in range(start_step, cfg.steps):
        idx = shard(batch_indices(len(train), global_batch, cfg.seed, step, lengths), env.rank, env.world)
        gen = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + env.rank)
        batch: Batch = obj.collate([train[i] for i in idx], gen).to(env.device)
        with _autocast(cfg, env):
            s, w = ddp(batch)
        loss = s / w.clamp_min(1e-8)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += batch.n_tokens * env.world
        history["train"].append([step + 1, float(loss.detach())])
        elapsed = trained_seconds + time.perf_counter() - tic
        bar.update(1)
        bar.set_postfix(loss=f"{history['train'][-1][1]:.3f}", tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        done = step + 1 == cfg.steps
        if env.main and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            vloss = validate()
            history["val"].append([step + 1, vloss])
            recent = [v for _, v in history["train"][-cfg.eval_every :]]
            bar.write(f"step {step + 1}/{cfg.steps}  train {sum(recent) / len(recent):.4f}  val {vloss:.4f}  "
                      f"lr {scheduler.get_last_lr()[0]:.2e}  {tokens_seen / max(elapsed, 1e-9):.0f} tok/s  "
                      f"{elapsed / 60:.1f} min")  # fmt: skip
        if env.main and cfg.save_every and ((step + 1) % cfg.save_every == 0 or done):
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({
                "adapter": get_peft_model_state_dict(model), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step + 1, "history": history,
                "seconds": elapsed, "tokens": tokens_seen, "rng": torch.get_rng_state(),
                "command": command,
            }, tmp)  # fmt: skip
            tmp.replace(ckpt_path)  # atomic: an interrupted save leaves the previous checkpoint
            plot_curve(history, out / "training_curve.png", f"{objective.value} on {model_dir.name}")
        env.barrier()
    bar.close()
    trained_seconds += time.perf_counter() - tic

    metrics: dict[str, Any] = {}
    if env.main:
        model.eval()
        save_dtype = getattr(torch, cfg.save_dtype)
        state = {k: v.to(save_dtype) for k, v in get_peft_model_state_dict(model).items()}
        model.save_pretrained(str(out), state_dict=state)
        write_json(out / ADAPTER_META, meta)
        # Name the base as maskserve does ('bundled' or the directory given), not this machine's cache path.
        adapter_config = json.loads((out / "adapter_config.json").read_text())
        write_json(out / "adapter_config.json", {**adapter_config, "base_model_name_or_path": cfg.model})
        cloze = None
        if cfg.cloze and objective is not Objective.SFT:
            cloze = _evaluate_cloze(cfg, model, tokenizer, kind, str(meta["mask_token"]))
        sources_path = Path(cfg.data + ".sources.json")
        last = [v for _, v in history["train"][-50:]]
        metrics = {
            "base_model": model_dir.name,
            "model_kind": kind.value,
            "objective_doc": OBJECTIVE_DOC[objective],
            "trainable_params": sum(p.numel() for p in trainable),
            "save_dtype": cfg.save_dtype,
            "mask_token": meta.get("mask_token"),
            "prefix_token": meta.get("prefix_token"),
            "data_sha256": _sha256(Path(cfg.data)),
            "sources": json.loads(sources_path.read_text()) if sources_path.is_file() else None,
            "n_train": len(train),
            "n_val": len(val),
            "steps_done": step + 1 if cfg.steps > start_step else start_step,
            "world_size": env.world,
            "device": f"{env.device.type} ({torch.get_num_threads()} threads)",
            "train_seconds": trained_seconds,
            "tokens_per_s": tokens_seen / max(trained_seconds, 1e-9),
            "final_train_loss": sum(last) / max(1, len(last)),
            "final_val_loss": history["val"][-1][1] if history["val"] else float("nan"),
            "command": command,
            "cloze": cloze,
            "history": history,
        }
        write_json(out / "metrics.json", metrics)
        plot_curve(history, out / "training_curve.png", f"{objective.value} on {model_dir.name}")
        (out / "README.md").write_text(model_card(config=asdict(cfg), meta=metrics))
    env.barrier()
    if env.world > 1:
        dist.destroy_process_group()
    return metrics


def _autocast(cfg: FinetuneConfig, env: Dist) -> contextlib.AbstractContextManager[Any]:
    if cfg.autocast == "bf16":
        return torch.autocast(device_type=env.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _evaluate_cloze(
    cfg: FinetuneConfig, model: nn.Module, tokenizer: Any, kind: ModelKind, mask_token: str
) -> dict[str, Any]:
    """The cloze set through the engine's fill-mask (the served scorer) on the model just trained; the adapter
    is already saved, so its maskserve.json gives the prefix token as it will when served."""
    from service.engine.fill.driver import FillDriver
    from service.training.eval import (
        DEFAULT_CLOZE,
        EvalMode,
        evaluate,
        read_cloze,
        summarize,
        summary_table,
        training_model,
    )

    items = read_cloze(DEFAULT_CLOZE if cfg.cloze == "default" else Path(cfg.cloze))
    if cfg.cloze_limit:
        items = items[: cfg.cloze_limit]
    loaded = training_model(model, tokenizer, kind, mask_token, Path(cfg.out))
    result = evaluate(FillDriver(loaded, load_settings()), items, [EvalMode.WHOLE_WORD, EvalMode.PLAIN])
    print(summary_table(result), flush=True)
    write_json(Path(cfg.out) / "cloze_eval.json", result)
    return summarize(result)
