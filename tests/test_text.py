"""Text out of token ids (inference/text.py): incremental detokenization, stop strings that never leak into the output."""

import pytest

from nanoseek.inference.text import TextDecoder
from nanoseek.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Où est la gare? 東京 🚀 END of story.\n\nNext paragraph."


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT * 3, "def main():\n    return 0\n" * 3], 300)


def feed(tok, text, stop):
    """Feed text's tokens one at a time as the engine would; the deltas handed out and the step it stopped at."""
    ids = tok.encode(text)
    stream, deltas, stopped = TextDecoder(tok, stop), [], None
    for n in range(1, len(ids) + 1):
        if stream(ids[:n]):
            stopped = n
            deltas.append(stream.take(final=True))
            break
        deltas.append(stream.take())
    else:
        deltas.append(stream.take(final=True))
    return deltas, stopped, ids


def test_streamed_text_is_the_decoded_text(tok):
    deltas, stopped, ids = feed(tok, TEXT, [])
    assert stopped is None and "".join(deltas) == TEXT == tok.decode(ids)


@pytest.mark.parametrize("stop", [["END"], ["lazy dog", "END"], ["\n\n"], ["gare? 東"], ["🚀"]])
def test_stop_strings_end_the_text_just_before_them(tok, stop):
    deltas, stopped, ids = feed(tok, TEXT, stop)
    first = min(TEXT.find(s) for s in stop)
    assert "".join(deltas) == TEXT[:first]
    # it stopped at the first token whose text completes the stop string, not later
    def text_of(n):
        stream = TextDecoder(tok)
        stream(ids[:n])
        return stream.text

    assert not any(s in text_of(stopped - 1) for s in stop) and any(s in text_of(stopped) for s in stop)
    # no delta handed out before the stop ever held a piece of a stop string
    assert not any(s in "".join(deltas) for s in stop)


def test_a_possible_stop_string_start_is_held_back_until_it_cannot_be_one(tok):
    stream = TextDecoder(tok, ["brown bear"])
    ids = tok.encode("The quick brown fox")
    seen = ""
    for n in range(1, len(ids) + 1):
        assert not stream(ids[:n])
        seen += stream.take()
        if stream.text.endswith(" brown"):
            assert seen == "The quick "  # "brown" could still become "brown bear"
    assert seen == "The quick brown fox"
    assert stream.take(final=True) == ""


def test_a_generation_ending_inside_a_character_keeps_its_bytes(tok):
    """Generation can stop in the middle of a multi-byte character; the text then ends as a one-shot
    decode ends it (a replacement character), instead of silently losing the bytes."""
    ids = tok.encode("🚀")
    assert len(ids) > 1  # the emoji's four bytes are more than one token of this small vocabulary
    stream = TextDecoder(tok)
    stream(ids[:-1])
    text = stream.take() + stream.take(final=True)
    assert text == tok.decode(ids[:-1]) and text.endswith("\ufffd")
