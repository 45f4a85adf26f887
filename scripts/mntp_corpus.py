"""Build the training sentences for the shipped MNTP adapter from Debian packages installed here.

    python scripts/mntp_corpus.py --out runs/data/mntp.txt       # installs the packages when missing (root)

Sources (each sentence keeps no link to its source once mixed; the counts go to ``<out>.sources.json``):

- WordNet 3.0 gloss examples (Debian ``wordnet-base``, licence: WordNet 3.0 licence, a permissive
  BSD-style licence from Princeton University): the quoted examples after ``|`` in ``/usr/share/wordnet/data.*``,
  e.g. "the critic snorted contemptuously". Capitalized and given a full stop, like ordinary sentences.
- The English side of the Ding German-English dictionary (Debian ``trans-de-en``, licence: GPL-2+, Frank
  Richter, TU Chemnitz): its example sentences, e.g. "Dad drove the car and we kids rode in the back.".
  Only entries that are whole sentences (capital letter, final punctuation, 4-16 words, no "sth"/"sb"
  placeholders) are kept.

The corpus is deduplicated, and every sentence that contains the context of a cloze item
(service/data/cloze.tsv: the words on either side of ``[MASK]``) is dropped, so the evaluation never
scores a sentence the adapter was trained on. The order is the sources' order; ``maskserve finetune``
shuffles from its seed. Nothing here is committed: run the script to rebuild the file.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACKAGES = {"wordnet-base": "/usr/share/wordnet/data.noun", "trans-de-en": "/usr/share/trans/de-en"}
CLOZE = Path(__file__).resolve().parent.parent / "service" / "data" / "cloze.tsv"
SOURCES = {
    "wordnet": {
        "package": "wordnet-base (Debian)",
        "files": "/usr/share/wordnet/data.{noun,verb,adj,adv}: quoted gloss examples",
        "license": "WordNet 3.0 License (Princeton University; permissive, BSD-style)",
    },
    "ding": {
        "package": "trans-de-en (Debian; Ding German-English dictionary)",
        "files": "/usr/share/trans/de-en: English example sentences",
        "license": "GPL-2+ (Frank Richter, TU Chemnitz)",
    },
}


def ensure_packages() -> None:
    """apt-get install what is missing (needs root, as on the project's machines)."""
    missing = [pkg for pkg, probe in PACKAGES.items() if not Path(probe).is_file()]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        sys.exit(f"missing Debian packages {missing} and no apt-get to install them")
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True)


def sentence_case(text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def wordnet_examples() -> list[str]:
    out = []
    for path in sorted(glob.glob("/usr/share/wordnet/data.*")):
        for line in Path(path).read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:  # licence header lines start with two spaces
                continue
            for quote in re.findall(r'"([^"]+)"', line.split("|", 1)[1]):
                quote = quote.strip().strip(";,").strip()
                if MIN_WORDS <= len(quote.split()) <= MAX_WORDS and "--" not in quote:
                    out.append(sentence_case(quote))
    return out


# Everyday sentences are short (the cloze set's are 5-12 words); long ones cost CPU time and add little.
MIN_WORDS, MAX_WORDS = 4, 16
SENTENCE = re.compile(r"[A-Z][A-Za-z ,'\-]+[a-z][.!?]")


def ding_sentences() -> list[str]:
    out = []
    for line in Path("/usr/share/trans/de-en").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or "::" not in line:
            continue
        for part in re.split(r"[|;]", line.split("::", 1)[1]):
            text = re.sub(r"\s*[\[{][^\]}]*[\]}]", "", part).strip()  # drop [Br.], {vt}, ...
            words = text.split()
            if (
                SENTENCE.fullmatch(text)
                and MIN_WORDS <= len(words) <= MAX_WORDS
                and not {"sth", "sb", "sth.", "sb."} & set(words)
            ):
                out.append(text)
    return out


def cloze_contexts(path: Path = CLOZE) -> list[tuple[str, str]]:
    """(left, right) lower-cased contexts of each cloze item."""
    contexts = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        sentence = line.split("\t")[-2]
        left, right = sentence.lower().split("[mask]")
        contexts.append((left.strip(), right.strip().rstrip(".!?")))
    return contexts


def leaks(sentence: str, contexts: list[tuple[str, str]]) -> bool:
    low = sentence.lower()
    return any((not left or left in low) and (not right or right in low) for left, right in contexts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/data/mntp.txt"))
    args = parser.parse_args()
    ensure_packages()
    contexts = cloze_contexts()
    seen: set[str] = set()
    lines: list[str] = []
    counts: dict[str, dict[str, object]] = {}
    for name, sentences in (("wordnet", wordnet_examples()), ("ding", ding_sentences())):
        kept = dropped = 0
        for sentence in sentences:
            key = sentence.lower()
            if key in seen:
                continue
            seen.add(key)
            if leaks(sentence, contexts):
                dropped += 1
                continue
            lines.append(sentence)
            kept += 1
        counts[name] = {**SOURCES[name], "sentences": kept, "dropped_cloze_overlap": dropped}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    sources_path = args.out.with_name(args.out.name + ".sources.json")
    sources_path.write_text(json.dumps(counts, indent=2) + "\n")
    print(f"{len(lines)} sentences -> {args.out}")
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
