"""Regressions in the server and its text layer: stop strings too long for the engine thread to search
each step, a completions batch larger than the queue, an engine-process callback that raises, and
stop strings of replacement characters left in the final text."""

import multiprocessing
import random
import threading
import types

import pytest

from nanoseek.inference.text import TextDecoder
from nanoseek.tokenizer import Tokenizer

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanoseek.serve import server  # noqa: E402
from nanoseek.serve.protocol import MAX_STOP_LENGTH  # noqa: E402
from nanoseek.serve.textgen import load_generator  # noqa: E402
from nanoseek.serve.worker import RemoteEngine, RemoteRequest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "The quick brown fox jumps over the lazy dog. Où est la gare? 東京 🚀 END of story.\n\nNext paragraph."


@pytest.fixture(scope="module")
def generator(tiny_served_model):
    return load_generator(tiny_served_model, max_batch_size=2, max_seq_len=64)


def test_a_stop_string_longer_than_the_limit_is_refused_naming_stop(generator):
    with TestClient(server.create_app(generator, model_name="tiny")) as client:
        for path, extra in [("/v1/completions", {"prompt": "def"}),
                            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            for stop in ("x" * (MAX_STOP_LENGTH + 1), ["a", "y" * 100_000]):
                r = client.post(path, json={"model": "tiny", "max_tokens": 2, "stop": stop, **extra})
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
                assert str(MAX_STOP_LENGTH) in r.json()["error"]["message"]
            r = client.post(path, json={"model": "tiny", "max_tokens": 2, "stop": ["z" * MAX_STOP_LENGTH] * 4, **extra})
            assert r.status_code == 200, r.text


def test_the_held_back_tail_is_the_longest_that_could_begin_a_stop_string():
    """_held_back jumps between candidate starts; it must give what trying every tail length gives."""
    rng = random.Random(0)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab\ufffd") for _ in range(rng.randrange(1, 6))) for _ in range(rng.randrange(1, 4))]
        text = "".join(rng.choice("ab\ufffd") for _ in range(rng.randrange(0, 10)))
        if any(s in text for s in stops):
            continue  # the request would have stopped: nothing is held back then
        decoder = object.__new__(TextDecoder)
        decoder.stop, decoder.text = stops, text
        expected = max((k for k in range(1, len(text) + 1) for s in stops if len(s) > k and s.startswith(text[-k:])),
                       default=0)
        assert decoder._held_back() == expected, (stops, text)


def test_a_completions_batch_larger_than_the_queue_is_a_400_not_a_retry_later(generator, monkeypatch):
    with TestClient(server.create_app(generator, model_name="tiny", max_queue=2)) as client:
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        # a batch that fits an empty queue still gets 429 while others wait: retrying later can work
        stats = generator.engine.stats
        monkeypatch.setattr(generator.engine, "stats", lambda: {**stats(), "waiting": 1})
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
        monkeypatch.undo()
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "max_tokens": 2})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text


def test_a_callback_that_raises_does_not_stop_the_engine_process_reader(capsys):
    """The reader thread hands every request its events; one request's callback raising must not end
    it, or every other request waits forever."""
    ours, theirs = multiprocessing.Pipe()
    process = types.SimpleNamespace(is_alive=lambda: True)
    info = {"config": None, "limits": None, "max_batch_size": 2, "stats": {"waiting": 0, "running": 0}}
    engine = RemoteEngine(process, ours, info, tokenizer=None)
    got, ended = [], threading.Event()

    def broken(delta, event):
        raise RuntimeError("the client's callback broke")

    def fine(delta, event):
        got.append((delta, event.finish_reason))
        if event.finished:
            ended.set()

    engine._requests = {0: RemoteRequest(0, [1], broken), 1: RemoteRequest(1, [1], fine),
                        2: RemoteRequest(2, [1], broken), 3: RemoteRequest(3, [1], fine)}
    engine.start()
    try:
        stats = {"waiting": 0, "running": 4}
        theirs.send(("events", [(0, "a", [5], False, None, None), (1, "b", [6], True, "stop", None)], stats))
        assert ended.wait(10), "request 1 never got its event"
        assert engine._reader.is_alive()
        ended.clear()
        theirs.close()  # the engine process is gone: every request left fails, the broken one first
        assert ended.wait(10), "request 3 never learned that the engine process died"
    finally:
        theirs.close()
        engine._reader.join(10)
    assert got == [("b", "stop"), ("", "error")]
    assert engine._requests == {} and "the client's callback broke" in capsys.readouterr().err


def test_a_stop_string_of_replacement_characters_is_kept_out_of_the_final_text():
    """A generation that ends inside a multi-byte character ends in U+FFFD (as a one-shot decode
    gives it); that final text is searched for stop strings too."""
    tok = Tokenizer.train([TEXT * 3], 300)
    ids = tok.encode("ab 🚀")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    for stop, expected in [("\ufffd", "ab "), (" \ufffd", "ab"), ("b \ufffd", "a")]:
        decoder, out = TextDecoder(tok, [stop]), ""
        for n in range(1, cut + 1):
            assert not decoder(ids[:n])  # the stream decoder holds the unfinished character back
            out += decoder.take()
        out += decoder.take(final=True)  # the request ended (max_tokens) inside the character
        assert out == expected, (stop, out)


def test_a_second_server_on_a_port_still_being_set_up_is_refused_at_once():
    first = server.bind("127.0.0.1", 0)  # a server that has bound its port and is loading its model
    try:
        with pytest.raises(OSError):  # bind alone (SO_REUSEADDR) succeeded twice; the second then hung
            server.bind("127.0.0.1", first.getsockname()[1]).close()
    finally:
        first.close()
