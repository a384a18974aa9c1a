"""The continuous-batching engine: joining mid-flight, cancellation, scheduling bounds, threads, streaming."""

import threading

import pytest

import nanoseek
from nanoseek.inference import Engine, SamplingParams

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 1, 250], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72], [30, 31]]
SETTINGS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=7),
            SamplingParams(temperature=1.2, top_k=30, min_p=0.02, repetition_penalty=1.3, seed=8),
            SamplingParams(temperature=0.6, seed=9)]


@pytest.fixture(scope="module")
def model():
    return nanoseek.build_model(nanoseek.get_preset("test"), seed=2).eval()


def alone(model, prompt, params, n):
    engine = Engine(model, max_batch_size=1, max_seq_len=128)
    request = engine.submit(prompt, params, max_new_tokens=n, stop_token_ids=[])
    engine.run_until_done()
    return request.result()


def test_request_added_mid_flight_yields_the_same_tokens_as_alone(model):
    lengths = [20, 6, 14, 9]  # some finish early, so later rows move into freed slots
    expected = [alone(model, p, s, n) for p, s, n in zip(PROMPTS, SETTINGS, lengths)]
    engine = Engine(model, max_batch_size=3, max_seq_len=128)
    requests = [engine.submit(PROMPTS[0], SETTINGS[0], max_new_tokens=lengths[0], stop_token_ids=[])]
    for _ in range(3):
        engine.step()
    requests.append(engine.submit(PROMPTS[1], SETTINGS[1], max_new_tokens=lengths[1], stop_token_ids=[]))
    engine.step()
    requests += [engine.submit(p, s, max_new_tokens=n, stop_token_ids=[])
                 for p, s, n in zip(PROMPTS[2:], SETTINGS[2:], lengths[2:])]  # the 4th waits for a slot
    batch_sizes = []
    while engine.has_work:
        engine.step()
        batch_sizes.append(engine.stats()["running"])
    assert [r.result() for r in requests] == expected
    assert max(batch_sizes) == 3
    assert all(r.finish_reason == "length" for r in requests)


def test_cancellation_frees_the_slot(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=128)
    first = engine.submit(PROMPTS[0], max_new_tokens=100, stop_token_ids=[])
    second = engine.submit(PROMPTS[1], max_new_tokens=5, stop_token_ids=[])
    engine.step()
    engine.step()
    assert engine.stats()["running"] == 1 and engine.stats()["waiting"] == 1
    first.cancel()
    engine.run_until_done()
    assert first.finish_reason == "cancelled" and 0 < len(first.tokens) < 100
    assert second.result() == alone(model, PROMPTS[1], SamplingParams(), 5)
    # cancelling a request that is still waiting
    third = engine.submit(PROMPTS[2], max_new_tokens=5)
    engine.cancel(third.id)
    engine.step()
    assert third.finish_reason == "cancelled" and third.tokens == []


def test_scheduler_respects_batch_and_token_bounds(model):
    engine = Engine(model, max_batch_size=3, max_cached_tokens=60, max_seq_len=64)
    requests = [engine.submit(p, max_new_tokens=20, stop_token_ids=[]) for p in PROMPTS]
    # reserves 27, 23, 32, 22 tokens: at most two fit under 60 at once
    peak = 0
    while engine.has_work:
        engine.step()
        stats = engine.stats()
        assert stats["running"] <= 3 and stats["reserved_tokens"] <= 60
        peak = max(peak, stats["running"])
    assert peak == 2 and all(len(r.result()) == 20 for r in requests)
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.submit(PROMPTS[0], max_new_tokens=60)
    with pytest.raises(ValueError, match="max_cached_tokens"):
        Engine(model, max_batch_size=1, max_cached_tokens=10, max_seq_len=64).submit(PROMPTS[0], max_new_tokens=8)


def test_background_thread_streams_to_other_threads(model):
    expected = [alone(model, p, s, 12) for p, s in zip(PROMPTS, SETTINGS)]
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    engine.start()
    try:
        results, callbacks = {}, []

        def client(i):  # submit from its own thread and read the stream
            request = engine.submit(PROMPTS[i], SETTINGS[i], max_new_tokens=12, stop_token_ids=[],
                                    on_event=callbacks.append)
            results[i] = [t for tokens in request for t in tokens]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [results[i] for i in range(len(PROMPTS))] == expected
        assert sum(e.finished for e in callbacks) == len(PROMPTS)
        stats = engine.stats()
        assert stats["generated_tokens"] == 12 * len(PROMPTS) and stats["finished"] == len(PROMPTS)
    finally:
        engine.stop(timeout=10)


def test_usage_and_stop_tokens(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    free = alone(model, PROMPTS[0], SamplingParams(), 10)
    request = engine.submit(PROMPTS[0], max_new_tokens=10, stop_token_ids=[free[4]])
    engine.run_until_done()
    cut = free.index(free[4])
    assert request.tokens == free[:cut] and request.finish_reason == "stop"
    assert request.usage == {"prompt_tokens": 7, "completion_tokens": cut, "total_tokens": 7 + cut}


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(model, monkeypatch):
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    request = engine.submit(PROMPTS[0], max_new_tokens=5)
    import nanoseek.inference.engine as engine_module

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(engine_module, "prefill", broken)
    with pytest.raises(RuntimeError, match="injected"):
        engine.step()
    assert request.finish_reason == "error" and "injected failure" in request.error
    monkeypatch.undo()
    again = engine.submit(PROMPTS[0], max_new_tokens=5, stop_token_ids=[])
    engine.run_until_done()
    assert again.result() == alone(model, PROMPTS[0], SamplingParams(), 5)


def test_a_request_whose_sampling_cannot_be_built_is_refused_at_submit_and_the_batch_runs_on(model):
    """Every step builds the running rows' settings as int64 tensors: a request whose top_k does
    not fit (SamplingParams refuses one, so it is forced in here) must be refused when it is
    submitted, not fail every request of the batch it would have joined."""
    engine = Engine(model, max_batch_size=2, max_seq_len=64)
    good = engine.submit(PROMPTS[0], max_new_tokens=10, stop_token_ids=[])
    engine.step()
    bad = SamplingParams(temperature=1.0, seed=0)
    object.__setattr__(bad, "top_k", 2**70)
    with pytest.raises(ValueError, match="do not fit"):
        engine.submit(PROMPTS[1], bad, max_new_tokens=5)
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.submit(PROMPTS[1], {"temperature": 1.0}, max_new_tokens=5)
    engine.run_until_done()
    assert good.finish_reason == "length" and good.result() == alone(model, PROMPTS[0], SamplingParams(), 10)
