from __future__ import annotations

import random

import pytest

from edge.engine.stop_strings import StopMatcher


def run(stops, chunks) -> tuple[list[str], bool]:
    """Feed chunks until a stop; return everything emitted (flush included) and whether it stopped."""
    matcher = StopMatcher(stops)
    out = []
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            return out, True
    return out + [matcher.flush()], False


def reference(stops, text) -> tuple[str, bool]:
    """Text up to the first stop to complete, scanning one character at a time."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def test_no_stops_passes_everything_through():
    matcher = StopMatcher([])
    assert matcher.feed("Hello") == ("Hello", False)
    assert matcher.feed(" world") == (" world", False)
    assert matcher.flush() == ""


def test_stop_inside_one_chunk_cuts_before_it():
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Hello<|end|>world") == ("Hello", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_split_across_many_chunks_is_never_emitted():
    out, stopped = run(["STOP"], list("abc STOP def"))
    assert stopped
    assert "".join(out) == "abc "
    assert out[4:] == ["", "", "", ""]  # "S", "T", "O" held back, then the stop completes


def test_held_prefix_is_released_when_it_stops_matching():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == ("go ", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.flush() == "ST"


def test_overlapping_stops_earliest_complete_match_wins():
    # "abc" is held as a prefix of "abcd", then "bce" completes first.
    out, stopped = run(["abcd", "bce"], list("xabce"))
    assert stopped and "".join(out) == "xa"
    matcher = StopMatcher(["<b>", "<a>"])
    assert matcher.feed("xx<b>yy<a>") == ("xx", True)


def test_first_completed_stop_wins_regardless_of_chunking():
    # "abbb" starts earlier but "b" completes first, whether fed at once or char by char.
    assert StopMatcher(["abbb", "b"]).feed("xabbbx") == ("xa", True)
    out, stopped = run(["abbb", "b"], list("xabbbx"))
    assert stopped and "".join(out) == "xa"
    # completing at the same character, the longer stop (starting earlier) wins
    assert StopMatcher(["b", "ab"]).feed("xab") == ("x", True)


def test_self_overlapping_stop():
    out, stopped = run(["aab"], list("aaab"))
    assert stopped and "".join(out) == "a"


def test_duplicate_and_invalid_stops():
    assert StopMatcher(["x", "x"]).stops == ("x",)
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher([None])


def test_random_chunkings_match_reference():
    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choices("ab", k=rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choices("abc", k=rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(0, 6), max(len(text) - 1, 0))))
        chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        out, stopped = run(stops, chunks)
        assert ("".join(out), stopped) == reference(stops, text), (stops, chunks)
