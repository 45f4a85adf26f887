"""The layering holds: wire models import no torch or tokenizer; every mask kind is documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.masks.kinds import MaskGroup, MaskKind

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL = sorted(p.stem for p in (ROOT / "service" / "api" / "protocol").glob("*.py") if p.stem != "__init__")


def test_protocol_imports_neither_torch_nor_transformers() -> None:
    imports = "; ".join(f"import service.api.protocol.{m}" for m in PROTOCOL)
    code = f"import sys; {imports}; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert PROTOCOL  # the package is where it should be
    assert out.stdout.strip() == "[]"


def test_every_mask_kind_is_in_the_metrics_docs() -> None:
    docs = (ROOT / "docs" / "production.md").read_text()
    missing = [k.value for k in MaskKind if f"`{k.value}`" not in docs]
    assert missing == []


def test_mask_kinds_fall_into_groups() -> None:
    assert MaskKind.MASK_TOKEN.group is MaskGroup.INPUT
    assert MaskKind.ATTENTION_EXCLUDE.group is MaskGroup.ATTENTION
    assert MaskKind.JSON_SCHEMA.group is MaskGroup.OUTPUT
    assert MaskKind.WHOLE_WORD.group is MaskGroup.OUTPUT
