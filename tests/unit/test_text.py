"""Incremental output text: UTF-8 split across tokens, stop sequences, what may be streamed."""

from __future__ import annotations

from service.engine.text import TextTracker


def feed(tracker: TextTracker, *chunks: bytes, start: int = 1) -> list[str]:
    """Add one token per chunk, numbering tokens from ``start``; return what each made streamable."""
    out = []
    for n, chunk in enumerate(chunks, start=start):
        tracker.add(chunk, n)
        out.append(tracker.take_safe())
    return out


def test_multibyte_character_appears_once_complete() -> None:
    t = TextTracker()
    assert feed(t, b"caf", "é".encode()[:1], "é".encode()[1:]) == ["caf", "", "é"]
    assert t.text == "café"


def test_incomplete_character_is_flushed_at_the_end() -> None:
    t = TextTracker()
    feed(t, b"a", b"\xc3")
    t.finish()
    assert t.text == "a\ufffd"


def test_stop_sequence_cuts_before_it_and_holds_back_its_prefix() -> None:
    t = TextTracker(stop=("END",))
    assert feed(t, b"hello E", b"N") == ["hello ", ""]  # "E", then "EN" may start "END": held back
    assert not t.stopped
    feed(t, b"D and more", start=3)
    assert t.stopped
    assert t.text == "hello "
    assert t.take_rest() == ""


def test_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    t = TextTracker(stop=("END",))
    assert feed(t, b"E", b"X") == ["", "EX"]
    t.finish()
    assert t.take_rest() == ""


def test_stop_sequences_count_only_after_min_tokens() -> None:
    t = TextTracker(stop=("x",), min_tokens=2)
    feed(t, b"ax", b"bx")  # two tokens: the first min_tokens, never matched
    assert not t.stopped
    feed(t, b"cx", start=3)
    assert t.stopped
    assert t.text == "axbxc"


def test_earliest_of_several_stops_wins() -> None:
    t = TextTracker(stop=("bc", "ab"))
    feed(t, b"xabc")
    assert t.text == "x"
