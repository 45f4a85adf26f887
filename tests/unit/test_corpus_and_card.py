"""The stage-4 corpus transformation (scripts/mntp_corpus.py ``content_first``) and the card it feeds
(service/training/report.py): exact sentences in, exact sentences out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from service.training.report import build_command, model_card

ROOT = Path(__file__).resolve().parents[2]
NOUNS = {"dog", "dawn", "box", "puppy", "bus", "glass", "cat"}


def _corpus_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mntp_corpus", ROOT / "scripts" / "mntp_corpus.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plural_nouns_are_regular_plurals_of_nouns() -> None:
    corpus = _corpus_script()
    words = ("dogs", "boxes", "puppies", "bus", "glass", "news", "cats")
    assert [w for w in words if corpus.is_plural_noun(w, NOUNS)] == ["dogs", "boxes", "puppies", "cats"]


def test_content_first_drops_articles_and_caps_each_first_word() -> None:
    corpus = _corpus_script()
    sentences = [
        "A dawn is the first light of day.",  # a definition: the noun comes first
        "The dogs barked at the stranger.",  # a plural subject: a generic plural
        "The bus was late again.",  # not a plural: kept as it is
        "A cat sat on the mat.",  # not a definition ("is" is not the third word): kept
        "He ran.",
        "He sang a song.",
        "He slept all day.",
        "He woke up early.",
    ]
    assert corpus.content_first(sentences, NOUNS, cap=2) == [
        "Dawn is the first light of day.",
        "Dogs barked at the stranger.",
        "The bus was late again.",
        "A cat sat on the mat.",
        "He ran.",  # four "He" sentences, at most 2: every second one
        "He slept all day.",
    ]


def test_the_card_names_the_corpus_command_and_lists_only_sources() -> None:
    adapter = ROOT / "service" / "adapters" / "smollm2-mntp"
    config = json.loads((adapter / "finetune_config.json").read_text())
    meta = json.loads((adapter / "metrics.json").read_text())
    card = model_card(config=config, meta=meta)
    assert "- _build" not in card
    assert "- wordnet: 34,178 sentences" in card
    assert "python scripts/mntp_corpus.py --out runs/data/mntp-v3.txt --content-first 800   # builds" in card
    assert build_command({}, "runs/data/x.txt") == "python scripts/mntp_corpus.py --out runs/data/x.txt"
