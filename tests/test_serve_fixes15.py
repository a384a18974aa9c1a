"""Regressions in the server, its engine process, the terminal chat and the compiled-step cache: an
empty --api-key that opened the server, a lower-case "bearer" refused, a NaN --stream-interval, a
short context that failed the warm-up, a submit into a just-died engine process, a failed chat
reply kept as if it had finished, and a non-finite NANOSEEK_CACHE_MB."""

import argparse
import io
import multiprocessing
import sys
import types
from argparse import Namespace

import pytest

from nanoseek.inference import aot
from nanoseek.inference.engine import Engine, RequestLimits
from nanoseek.inference.sampling import SamplingParams

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanoseek.serve import chat, server  # noqa: E402
from nanoseek.serve.textgen import load_generator  # noqa: E402
from nanoseek.serve.worker import EngineStopped, RemoteEngine  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def serve_flags(*extra: str):
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return parser.parse_args(["--model", "m", *extra])


@pytest.mark.parametrize("extra", [("--api-key", ""), ("--api-key", " key "), ("--stream-interval", "nan"),
                                   ("--stream-interval", "inf")])
def test_an_empty_api_key_and_a_non_finite_stream_interval_are_refused_before_the_load(extra):
    # "" made every request pass the key check (and silenced the warning for a public --host); with
    # NaN the engine process sent a stream's first token and then nothing until its end
    error = server.flag_error(serve_flags(*extra))
    assert error and extra[0] in error
    assert server.flag_error(serve_flags("--api-key", "sesame", "--stream-interval", "0")) is None


def test_the_bearer_scheme_is_case_insensitive(tiny_served_model):
    generator = load_generator(tiny_served_model, max_batch_size=1, max_seq_len=32)
    with TestClient(server.create_app(generator, model_name="tiny", api_key="sesame")) as client:
        for header in ("Bearer sesame", "bearer sesame", "BEARER  sesame"):
            assert client.get("/v1/models", headers={"Authorization": header}).status_code == 200, header
        for header in ("bearer wrong", "Bearer", "Basic sesame", None):
            response = client.get("/v1/models", headers={"Authorization": header} if header else {})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", header


@pytest.mark.parametrize("limits", [dict(max_seq_len=2), dict(max_seq_len=3), dict(max_cached_tokens=4),
                                    dict(max_cached_tokens=4, speculative=1)])
def test_a_context_of_a_few_tokens_loads_and_serves(tiny_served_model, limits):
    # the warm-up prompt ("Hello" with its bos, 4 tokens here) + 2 new tokens failed the load of any
    # context under 6 tokens, which the flags allow down to 2
    generator = load_generator(tiny_served_model, max_batch_size=1, **limits)
    with TestClient(server.create_app(generator, model_name="tiny")) as client:
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": [5], "max_tokens": 1})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1, response.text


def test_a_submit_into_an_engine_process_that_just_died_is_engine_stopped():
    # the child's end of the pipe is gone while its process still looks alive: the send failed with
    # BrokenPipeError (a 500) and left the request among those the reader waits for
    ours, theirs = multiprocessing.Pipe()
    theirs.close()
    limits = RequestLimits(vocab_size=64, max_seq_len=32, max_cached_tokens=32, draft_tokens=0, eos_token_ids=(1,))
    info = {"config": None, "limits": limits, "max_batch_size": 1, "stats": {"waiting": 0, "running": 0}}
    engine = RemoteEngine(types.SimpleNamespace(is_alive=lambda: True), ours, info, tokenizer=None)
    with pytest.raises(EngineStopped):
        engine.submit([5, 6], SamplingParams(), max_new_tokens=2, stop_strings=["\n"], ignore_eos=False, on_text=None,
                      images=None)
    assert engine._requests == {} and engine.stats()["waiting"] == 0
    ours.close()


def test_a_submit_the_reader_failed_while_it_was_sent_returns_the_failed_request():
    """The reader fails every request (and calls its callback) between the submit's registration and
    its failed send: the caller gets that failed request, not EngineStopped for a request whose
    callback already ran (the server then found no generation for the callback's index)."""
    limits = RequestLimits(vocab_size=64, max_seq_len=32, max_cached_tokens=32, draft_tokens=0, eos_token_ids=(1,))
    info = {"config": None, "limits": limits, "max_batch_size": 1, "stats": {"waiting": 0, "running": 0}}
    events = []

    class DyingPipe:
        def send(self, message):
            engine._fail_all("the engine process exited")
            raise BrokenPipeError(32, "Broken pipe")

    engine = RemoteEngine(types.SimpleNamespace(is_alive=lambda: True), DyingPipe(), info, tokenizer=None)
    request = engine.submit([5, 6], SamplingParams(), max_new_tokens=2, stop_strings=["\n"], ignore_eos=False,
                            on_text=lambda delta, event: events.append(event), images=None)
    assert request.finish_reason == "error" and len(events) == 1 and events[0].finished
    assert engine._requests == {}


def test_a_chat_reply_the_engine_failed_is_said_and_not_kept(tiny_served_model, monkeypatch, capsys):
    generators = []

    def load(*args, **kwargs):
        generators.append(load_generator(*args, **kwargs))
        decode = Engine._decode

        def fail_once(self):  # the first reply's first decode step fails, as a step on a broken device would
            if not generators[0].failed:
                generators[0].failed = True
                raise RuntimeError("the device went away")
            return decode(self)

        generators[0].failed = False
        monkeypatch.setattr(Engine, "_decode", fail_once)
        return generators[0]

    monkeypatch.setattr(chat, "load_generator", load)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nHello there\n"))
    args = Namespace(model=str(tiny_served_model), system=None, temperature=0.0, top_p=1.0, max_tokens=3, seed=None,
                     max_seq_len=64, dtype=None, device="cpu", speculative=0, compile=False)
    assert chat.run(args) == 0
    out = capsys.readouterr().out
    assert "(the reply failed: RuntimeError: the device went away; it was not kept)" in out
    # the second turn is the first one again: the failed reply did not join the conversation
    alone = len(generators[0].tokenizer.encode_chat([{"role": "user", "content": "Hello there"}]))
    turns = [line for line in out.splitlines() if "tokens in" in line]
    # (how many tokens the reply then has depends on the fixture's weights: up to 3, fewer at an EOS)
    assert len(turns) == 1 and f"({alone} tokens in, " in turns[0], out


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_cache_budget_is_a_clear_error_or_no_limit(monkeypatch, value):
    # int() of NaN or inf raised inside every ahead-of-time build, which then fell back to torch.compile
    monkeypatch.setenv("NANOSEEK_CACHE_MB", value)
    if value == "nan":
        with pytest.raises(ValueError, match="NANOSEEK_CACHE_MB"):
            aot.cache_budget_bytes()
    else:
        assert aot.cache_budget_bytes() >= 2**62
