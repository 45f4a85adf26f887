"""What every run leaves beside its adapter: a training-curve PNG and a model card (README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plot_curve(history: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Train loss (raw and smoothed) and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train = history.get("train", [])
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, color="#9ecae1", linewidth=0.8, label="train (per step)")
        window = max(1, len(losses) // 25)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
        ax.plot(steps, smooth, color="#08519c", linewidth=1.6, label=f"train (mean of {window})")
    val = history.get("val", [])
    if val:
        vsteps, vlosses = zip(*val, strict=True)
        ax.plot(vsteps, vlosses, "o-", color="#e6550d", linewidth=1.6, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pct(x: object) -> str:
    return f"{float(x):.1%}" if isinstance(x, int | float) else "n/a"


def model_card(*, config: dict[str, Any], meta: dict[str, Any]) -> str:
    """The card: base model, objective, masks, data (sources and licences), steps, metrics, command."""
    m = meta
    lines = [
        f"# {config['objective'].upper()} adapter for {m['base_model']}",
        "",
        "Written by `maskserve finetune` (service/training/finetune.py).",
        "",
        "## Model",
        f"- Base model: {m['base_model']} ({m['model_kind']})",
        f"- Objective: `{config['objective']}` — {m['objective_doc']}",
        f"- LoRA: r={config['lora_r']}, alpha={config['lora_alpha']}, dropout={config['lora_dropout']}, "
        f"targets `{config['lora_targets']}`; {m['trainable_params']:,} trainable parameters, saved as "
        f"{m['save_dtype']} safetensors",
    ]
    if config["objective"] in ("mlm", "mntp"):
        lines.append(
            f"- Input mask: {config['mask_strategy']} masking of {config['mask_ratio']:.0%} of the tokens, "
            f"{config['replace_prob']:.0%} mask token / {config['random_prob']:.0%} random / "
            f"{1 - config['replace_prob'] - config['random_prob']:.0%} kept; mask token `{m.get('mask_token')}`"
        )
        if config.get("first_word_prob"):
            lines.append(
                f"- Sentence starts: the first word is masked as well in {config['first_word_prob']:.0%} of examples"
            )
        lines.append("- Attention mask: bidirectional over real tokens (padding masked)")
    if config["objective"] == "mntp":
        lines.append(
            f"- Masked token i is predicted from the output at i-1 (LLM2Vec); each sentence starts with "
            f"`{m.get('prefix_token')}`"
        )
    if config["objective"] == "sft":
        lines.append(
            f"- Loss mask: prompt tokens weighted {config['prompt_loss_weight']}; packed into rows of "
            f"{config['pack_length']} tokens with a block-diagonal ∧ causal attention mask and per-example positions"
        )
    lines += [
        "",
        "## Data",
        f"- File: `{config['data']}` (sha256 {m['data_sha256'][:16]}…), {m['n_train']:,} training and "
        f"{m['n_val']:,} validation examples (split and order from seed {config['seed']})",
    ]
    sources = m.get("sources") or {}
    for name, src in sources.items():
        if name.startswith("_"):  # how the corpus was built (scripts/mntp_corpus.py), not a source
            continue
        lines.append(
            f"- {name}: {src.get('sentences', '?'):,} sentences from {src.get('package')}, {src.get('files')}; "
            f"licence {src.get('license')}"
        )
    lines += [
        "",
        "## Training",
        f"- Steps: {m['steps_done']} of {config['steps']} × batch {config['batch_size']} × {m['world_size']} "
        f"process(es); lr {config['lr']} (warmup {config['warmup_steps']}, cosine to "
        f"{config['min_lr_ratio']}×), AdamW, grad clip {config['grad_clip']}, seed {config['seed']}",
        f"- Wall time: {m['train_seconds'] / 60:.1f} min on {m['device']} ({m['tokens_per_s']:.0f} tokens/s)",
        f"- Final train loss (mean of last 50 steps): {m['final_train_loss']:.3f}; validation loss: "
        f"{m['final_val_loss']:.3f}",
        *[f"- Note: {note}" for note in m.get("notes") or []],
        "",
        "![training curve](training_curve.png)",
    ]
    cloze = m.get("cloze")
    if isinstance(cloze, dict):
        lines += [
            "",
            f"## Fill-mask evaluation ({cloze['n']} cloze sentences)",
            "",
            "| mode | top-1 | top-5 |",
            "|---|---|---|",
        ]
        for mode in ("whole_word", "plain"):
            r = cloze.get(mode)
            if isinstance(r, dict):
                lines.append(f"| {mode} | {_pct(r['top1'])} | {_pct(r['top5'])} |")
        whole = cloze.get("whole_word")
        if isinstance(whole, dict) and isinstance(whole.get("categories"), dict):
            lines += ["", "Whole-word, by category:", "", "| category | n | top-1 | top-5 |", "|---|---|---|---|"]
            for cat, r in whole["categories"].items():
                lines.append(f"| {cat} | {r['n']} | {_pct(r['top1'])} | {_pct(r['top5'])} |")
        lines += ["", "Measured with:", "```", str(m.get("cloze_command") or m["command"]), "```"]
    lines += [
        "",
        "## Reproduce",
        "```",
        *([f"{build_command(sources, config['data'])}   # builds the data (apt-get installs)"] if sources else []),
        m["command"],
        "```",
        "",
        "Resolved configuration: `finetune_config.json`.",
        "",
    ]
    return "\n".join(lines)


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def refresh_card(out: Path, cloze: dict[str, Any], command: str) -> None:
    """Record a later evaluation in ``metrics.json`` and rewrite the card of a finished run."""
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "finetune_config.json").read_text())
    metrics["cloze"] = cloze
    metrics["cloze_command"] = command
    write_json(out / "metrics.json", metrics)
    (out / "README.md").write_text(model_card(config=config, meta=metrics))


def build_command(sources: dict[str, Any], data: str) -> str:
    """The command that built the training corpus, as scripts/mntp_corpus.py recorded it (``_build``)."""
    build = sources.get("_build")
    command = build.get("command") if isinstance(build, dict) else None
    return str(command) if command else f"python scripts/mntp_corpus.py --out {data}"
