"""Build the training sentences for the shipped MNTP adapter from Debian packages installed here.

    python scripts/mntp_corpus.py --out runs/data/mntp.txt       # installs the packages when missing (root)

Sources (each sentence keeps no link to its source once mixed; the counts go to ``<out>.sources.json``):

- WordNet 3.0 gloss examples (Debian ``wordnet-base``, licence: WordNet 3.0 licence, a permissive
  BSD-style licence from Princeton University): the quoted examples after ``|`` in ``/usr/share/wordnet/data.*``,
  e.g. "the critic snorted contemptuously". Capitalized and given a full stop, like ordinary sentences.
- WordNet 3.0 noun definitions (same package and licence): "<Noun> is <gloss>." for one-word nouns, their
  first sense, e.g. "A dawn is the first light of day.", "Saturnalia is an orgiastic festival in ancient Rome
  in honor of Saturn." Names come from the person, location, object, event and communication files only
  (not Latin genera); no definition is headed by a cloze answer. They put nouns and names first in a
  sentence, where the other sources mostly have "The", "A", "He", "I".
- Sentences of the Debian ``fortunes`` data files (fortune-mod; BSD-3-Clause; not the offensive set), split
  at sentence ends, 4-16 words, letters and plain punctuation only.
- The English side of the Ding German-English dictionary (Debian ``trans-de-en``, licence: GPL-2+, Frank
  Richter, TU Chemnitz): its example sentences, e.g. "Dad drove the car and we kids rode in the back.".
  Only entries that are whole sentences (capital letter, final punctuation, 4-16 words, no "sth"/"sb"
  placeholders) are kept.

The corpus is deduplicated, and every sentence that contains the context of a cloze item
(every service/data/cloze*.tsv: the words on either side of ``[MASK]``) is dropped, so the evaluation never
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

PACKAGES = {
    "wordnet-base": "/usr/share/wordnet/data.noun",
    "trans-de-en": "/usr/share/trans/de-en",
    "fortunes": "/usr/share/games/fortunes/fortunes",
}
DATA_DIR = Path(__file__).resolve().parent.parent / "service" / "data"
FORTUNES = Path("/usr/share/games/fortunes")
# Definitions are one sentence shape ("A piano is a keyboard instrument ..."): enough to put nouns and
# names first in a sentence, not so many that the shape dominates.
MAX_COMMON_GLOSSES = 10_000
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
    "wordnet_glosses": {
        "package": "wordnet-base (Debian)",
        "files": "/usr/share/wordnet/{index,data}.noun: the first sense's gloss of one-word nouns, as "
        "'<Noun> is <gloss>.' ('Ostrava is an industrial city in northwestern Czech Republic ...')",
        "license": "WordNet 3.0 License (Princeton University; permissive, BSD-style)",
    },
    "fortunes": {
        "package": "fortunes (Debian; fortune-mod data files, not the offensive set)",
        "files": "/usr/share/games/fortunes/*: sentences split from the fortunes",
        "license": "BSD-3-Clause (fortune-mod, The Regents of the University of California)",
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


def cloze_lines(data_dir: Path = DATA_DIR) -> list[list[str]]:
    """The columns of every item of every cloze file (``service/data/cloze*.tsv``)."""
    rows = []
    for path in sorted(data_dir.glob("cloze*.tsv")):
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                rows.append(line.split("\t"))
    return rows


def _first_senses(index: Path) -> dict[str, str]:
    """lemma -> the synset offset of its first (most frequent) sense, from a WordNet index file."""
    first = {}
    for line in index.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue
        fields = line.split()
        lemma, synsets = fields[0], int(fields[2])
        first[lemma] = fields[-synsets]
    return first


# WordNet lexicographer files whose capitalized nouns are names people use: communication (languages, works),
# event, location, object (planets, rivers), person. Animals, groups and plants hold Latin genera instead.
NAME_LEXFILES = {"10", "11", "15", "17", "18"}
GLOSS = re.compile(r"[A-Za-z][A-Za-z ,'\-]*[a-z]")


def wordnet_glosses(excluded: set[str]) -> list[str]:
    """'<Noun> is <gloss>.' for one-word nouns (first sense), names as written, common nouns with an article.

    ``excluded`` (the cloze answers) never head a definition: "Jupiter is the largest planet ..." would
    teach the facts the cloze set asks.
    """
    first = _first_senses(Path("/usr/share/wordnet/index.noun"))
    names, common = [], []
    for line in Path("/usr/share/wordnet/data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        offset, lexfile, word = fields[0], fields[1], fields[4]
        if not word.isalpha() or word.lower() in excluded or first.get(word.lower()) != offset:
            continue
        if word[0].isupper() and lexfile not in NAME_LEXFILES:  # Latin genera and families: "Stachys is ..."
            continue
        gloss = re.sub(r"\([^)]*\)", "", gloss.split(";", 1)[0]).strip()
        gloss = " ".join(gloss.split())
        if not GLOSS.fullmatch(gloss) or not 3 <= len(gloss.split()) <= 12:
            continue
        if word[0].isupper():
            subject = word
        else:
            subject = ("An " if word[0] in "aeiou" else "A ") + word
        if not gloss.startswith(("a ", "an ", "the ", "any ", "one ", "someone ", "something ")):
            gloss = ("an " if gloss[0].lower() in "aeiou" else "a ") + gloss
        (names if word[0].isupper() else common).append(f"{subject} is {gloss}.")
    return names + common[:: max(1, len(common) // MAX_COMMON_GLOSSES + 1)][:MAX_COMMON_GLOSSES]


def fortune_sentences() -> list[str]:
    """Sentences of the (inoffensive) fortunes, each a line of its own."""
    out = []
    for path in sorted(FORTUNES.iterdir()):
        if "." in path.name or not path.is_file():  # skip the .dat indexes and .u8 links
            continue
        for fortune in path.read_text(encoding="latin-1").split("\n%\n"):
            text = " ".join(fortune.split())
            for sentence in re.split(r"(?<=[.!?])\s+", text):
                if SENTENCE.fullmatch(sentence) and MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                    out.append(sentence)
    return out


def noun_lemmas() -> set[str]:
    """Every one-word WordNet noun lemma, lower case ("dog", "cheese", "jupiter")."""
    lines = Path("/usr/share/wordnet/index.noun").read_text(encoding="latin-1").splitlines()
    return {line.split(" ", 1)[0] for line in lines if not line.startswith("  ") and line[0].isalpha()}


def is_plural_noun(word: str, nouns: set[str]) -> bool:
    """ "dogs", "boxes", "puppies": a regular plural of a WordNet noun ("bus", "glass", "news" are not)."""
    if not word.endswith("s") or word.endswith("ss"):
        return False
    return (
        word[:-1] in nouns
        or (word.endswith("es") and word[:-2] in nouns)
        or (word.endswith("ies") and word[:-3] + "y" in nouns)
    )


def content_first(sentences: list[str], nouns: set[str], cap: int) -> list[str]:
    """Sentences whose first word is more often a content word (``--content-first``, stage 4 of the adapter).

    Every other source starts a sentence with "The", "A", "He" or "I" (a third of them "The" or "A"), and a
    first word masked in training then teaches that prior: the sentence-initial cloze items were answered
    "It", "He", "They" whatever they said (docs/finetune.md). So:
    - a definition "A dawn is the first light of day." loses its article: "Dawn is the first light of day.";
    - "The dogs barked at the stranger." loses "The" before a plural noun: "Dogs barked at the stranger."
      (a generic plural, as "[MASK] bark loudly when ..." wants "Dogs");
    - then no first word (case-folded) heads more than ``cap`` sentences; the rest of each such word's
      sentences are dropped, evenly spread over the list.
    """
    out = []
    for sentence in sentences:
        words = sentence.split(" ")
        head = words[1].lower() if len(words) > 2 else ""
        definition = words[0] in ("A", "An") and words[2:3] == ["is"] and head in nouns
        plural_subject = words[0] == "The" and is_plural_noun(head, nouns)
        if len(words) > 3 and head.isalpha() and (definition or plural_subject):
            sentence = " ".join([head.capitalize(), *words[2:]])
        out.append(sentence)
    by_first: dict[str, list[int]] = {}
    for i, sentence in enumerate(out):
        by_first.setdefault(sentence.split(" ", 1)[0].lower(), []).append(i)
    keep = set()
    for indices in by_first.values():
        step = max(1, -(-len(indices) // cap))  # ceil: every step-th sentence, at most ``cap`` of them
        keep.update(indices[::step][:cap])
    return [sentence for i, sentence in enumerate(out) if i in keep]


def cloze_contexts(rows: list[list[str]]) -> list[tuple[str, str]]:
    """(left, right) lower-cased contexts of each cloze item."""
    contexts = []
    for cols in rows:
        left, right = cols[-2].lower().split("[mask]")
        contexts.append((left.strip(), right.strip().rstrip(".!?")))
    return contexts


def cloze_answers(rows: list[list[str]]) -> set[str]:
    return {a.lower() for cols in rows for a in cols[-1].split("|") if a}


def leaks(sentence: str, contexts: list[tuple[str, str]]) -> bool:
    low = sentence.lower()
    return any((not left or left in low) and (not right or right in low) for left, right in contexts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/data/mntp.txt"))
    parser.add_argument(
        "--sources",
        default="wordnet,ding,wordnet_glosses,fortunes",
        help="comma-separated, in this order of precedence (the shipped adapter's stage 1 used wordnet,ding)",
    )
    parser.add_argument(
        "--content-first",
        type=int,
        metavar="CAP",
        help="stage 4's corpus: articles dropped before definitions' nouns and plural subjects, and at most CAP "
        "sentences for each first word (see content_first)",
    )
    args = parser.parse_args()
    wanted = args.sources.split(",")
    if unknown := set(wanted) - set(SOURCES):
        parser.error(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
    ensure_packages()
    rows = cloze_lines()
    contexts = cloze_contexts(rows)
    seen: set[str] = set()
    lines: list[str] = []
    counts: dict[str, dict[str, object]] = {}
    readers = {
        "wordnet": wordnet_examples,
        "ding": ding_sentences,
        "wordnet_glosses": lambda: wordnet_glosses(cloze_answers(rows)),
        "fortunes": fortune_sentences,
    }
    for name in wanted:
        sentences = readers[name]()
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
    if args.content_first:
        before = len(lines)
        lines = content_first(lines, noun_lemmas(), args.content_first)
        # Not a source (keys starting with "_" are not listed as one): how the corpus was built, for the card.
        counts["_build"] = {
            "command": f"python scripts/mntp_corpus.py --out {args.out} --content-first {args.content_first}",
            "content_first": {"cap": args.content_first, "sentences_before": before, "sentences": len(lines)},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    sources_path = args.out.with_name(args.out.name + ".sources.json")
    sources_path.write_text(json.dumps(counts, indent=2) + "\n")
    print(f"{len(lines)} sentences -> {args.out}")
    print(json.dumps(counts, indent=2))


if __name__ == "__main__":
    main()
