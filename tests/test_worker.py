"""The engine in its own process (serve/worker.py): the same text, tokens and finish reasons as in
process, bad requests refused at once, and a dead engine process failing requests, not hanging them."""

import os
import signal
import threading
import time

import pytest

from nanoseek.inference import SamplingParams
from nanoseek.serve.textgen import load_generator
from nanoseek.serve.worker import EngineProcess, EngineStopped
from nanoseek.tokenizer import Tokenizer

pytest.importorskip("fastapi")


def run(generator, jobs):
    """Submit every job at once; (text, finish_reason, usage) of each once all have finished."""
    texts = [""] * len(jobs)
    done = [threading.Event() for _ in jobs]

    def on_text(i):
        def call(delta, event):
            texts[i] += delta
            if event.finished:
                done[i].set()
        return call

    generations = [generator.submit(**job, on_text=on_text(i)) for i, job in enumerate(jobs)]
    for event in done:
        assert event.wait(60)
    return [(t, g.finish_reason, g.usage) for t, g in zip(texts, generations)]


def test_engine_process_gives_what_the_engine_in_process_gives(tiny_served_model):
    tok = Tokenizer.load(tiny_served_model)
    prompts = [tok.encode(p, bos=True) for p in ("def f(x):", "import os", "class A:")]
    local = load_generator(tiny_served_model, max_batch_size=2, max_seq_len=128)
    local.engine.start()
    try:
        # a stop string that this random model's greedy continuation holds, some way in
        (free_text, _, _), = run(local, [dict(prompt_ids=prompts[2], params=SamplingParams(), max_tokens=40,
                                              ignore_eos=True)])
        stop = free_text[len(free_text) // 2:][:2]
        jobs = [dict(prompt_ids=prompts[0], params=SamplingParams(), max_tokens=30, ignore_eos=True),
                dict(prompt_ids=prompts[1], params=SamplingParams(temperature=0.9, top_p=0.9, seed=4), max_tokens=25),
                dict(prompt_ids=prompts[2], params=SamplingParams(), max_tokens=40, stop=[stop], ignore_eos=True)]
        expected = run(local, jobs)
    finally:
        local.engine.stop(5)
    remote = EngineProcess.start(tiny_served_model, max_batch_size=2, max_seq_len=128)
    remote.engine.start()
    try:
        assert run(remote, jobs) == expected  # jobs 0 and 1 are detokenized here, job 2 (stop strings) in the child
        assert expected[2][1] == "stop" and free_text.startswith(expected[2][0]) and stop not in expected[2][0]
        stats = remote.engine.stats()
        assert stats["running"] == 0 and stats["finished"] == 1 + 3 and stats["busy_seconds"] > 0  # warm-up + ours
        # refused in this process, before anything crosses: the same message the engine gives
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            remote.submit(prompts[0], SamplingParams(), max_tokens=200)
        # a cancelled request ends with "cancelled" and frees its slot
        started = threading.Event()
        g = remote.submit(prompts[0], SamplingParams(), max_tokens=100, ignore_eos=True,
                          on_text=lambda delta, event: started.set())
        assert started.wait(30)
        assert g.request.text is not None  # no stop strings: its text is made in this process, not the engine's
        remote.engine.cancel(g.request)
        assert g.request.wait(30) and g.finish_reason == "cancelled" and len(g.request.tokens) < 100
    finally:
        remote.engine.stop(10)
    assert not remote.engine.alive


def test_a_dead_engine_process_fails_its_requests_and_refuses_new_ones(tiny_served_model):
    remote = EngineProcess.start(tiny_served_model, max_batch_size=2, max_seq_len=512)
    remote.engine.start()
    try:
        tok = Tokenizer.load(tiny_served_model)
        started = threading.Event()
        g = remote.submit(tok.encode("x", bos=True), SamplingParams(), max_tokens=500, ignore_eos=True,
                          on_text=lambda delta, event: started.set())
        assert started.wait(30)
        os.kill(remote.engine.pid, signal.SIGKILL)
        assert g.request.wait(30) and g.finish_reason == "error"
        deadline = time.time() + 10
        while remote.engine.alive and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(EngineStopped):
            remote.submit(tok.encode("y", bos=True), SamplingParams(), max_tokens=5)
    finally:
        remote.engine.stop(5)


def test_a_load_error_in_the_engine_process_comes_back_as_an_error(tmp_path, tiny_served_model):
    with pytest.raises(ValueError, match="max_seq_len"):
        EngineProcess.start(tiny_served_model, max_seq_len=10**6)


def test_the_engine_process_batches_its_messages_but_not_first_tokens_or_ends(tiny_served_model):
    """With send_interval, a request's steps arrive a few at a time, its first token and its end at
    once, and the text is the same as with a message per step."""
    tok = Tokenizer.load(tiny_served_model)
    job = dict(prompt_ids=tok.encode("def f(x):", bos=True), params=SamplingParams(), max_tokens=40, ignore_eos=True)
    texts = {}
    for interval in (0.0, 30.0):
        remote = EngineProcess.start(tiny_served_model, max_batch_size=2, max_seq_len=128, send_interval=interval)
        remote.engine.start()
        try:
            calls, first_token, ended = [], threading.Event(), threading.Event()

            def on_text(delta, event):
                calls.append(len(event.tokens))
                first_token.set()
                if event.finished:
                    ended.set()

            g = remote.submit(**job, on_text=on_text)
            assert first_token.wait(20) and ended.wait(20)  # neither waited for the 30 s interval
            texts[interval] = tok.decode(g.request.tokens, skip_special_tokens=True)
            assert sum(calls) == 40
            if interval:  # the first step's tokens (prefill and one decode) at once, then the rest with the end
                assert len(calls) == 2 and calls[0] <= 2
            else:  # a message per step
                assert len(calls) >= 39
        finally:
            remote.engine.stop(5)
    assert texts[0.0] == texts[30.0] and len(texts[0.0]) > 0

