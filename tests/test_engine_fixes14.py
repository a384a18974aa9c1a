"""Engine regressions: a cache kept in another dtype than the model, callbacks that use the engine
while a queued request is cancelled, and a broken or mistaken stop callable."""

import threading

import pytest
import torch

import nanoseek
from nanoseek.inference import Engine, SamplingParams, stream


@pytest.fixture(scope="module")
def model():
    return nanoseek.build_model(nanoseek.get_preset("test"), seed=2).eval()


@pytest.mark.parametrize("draft_tokens", [0, 2])
def test_a_bf16_cache_under_an_fp32_model_decodes(model, draft_tokens):
    """Engine(cache_dtype=...) keeps latents in that dtype; the absorbed attention must read them in
    the model's (it failed with 'expected m1 and m2 to have the same dtype' at the first decode)."""
    engine = Engine(model, max_batch_size=2, max_seq_len=32, speculative=draft_tokens, cache_dtype=torch.bfloat16)
    assert engine.cache.kv.dtype == torch.bfloat16
    requests = [engine.submit(p, SamplingParams(), max_new_tokens=6, stop_token_ids=[]) for p in ([1, 2, 3], [9])]
    engine.run_until_done()
    reference = nanoseek.generate(model, [[1, 2, 3], [9]], 6, stop_token_ids=[])
    assert [r.result() for r in requests] == reference  # bf16 latents do not flip this random model's argmax


def test_on_event_of_a_cancelled_waiting_request_may_call_the_engine(model):
    """A queued request's cancellation event was delivered under the engine's lock, so a callback
    calling stats() (or submit, cancel) deadlocked the engine thread."""
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    seen = []
    engine.submit([1, 2], max_new_tokens=3)
    waiting = engine.submit([1, 2], max_new_tokens=3, on_event=lambda event: seen.append(engine.stats()["waiting"]))
    waiting.cancel()
    thread = threading.Thread(target=engine.run_until_done, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the engine thread deadlocked"
    assert waiting.finish_reason == "cancelled" and len(seen) == 1


def test_a_stop_callable_that_raises_fails_only_its_own_request(model):
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    good = engine.submit([1, 2, 3], max_new_tokens=5, stop_token_ids=[])

    def broken(tokens):
        raise KeyError("broken stop")

    bad = engine.submit([4, 5], max_new_tokens=5, stop_token_ids=[], stop=broken)
    engine.run_until_done()
    assert bad.finish_reason == "error" and "broken stop" in bad.error
    assert good.finish_reason == "length" and good.result() == nanoseek.generate(model, [[1, 2, 3]], 5, stop_token_ids=[])[0]


def test_stop_strings_given_where_a_callable_belongs_are_refused_at_submit(model):
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    with pytest.raises(ValueError, match="StopStrings"):
        engine.submit([1, 2], max_new_tokens=3, stop=["\n"])
    with pytest.raises(ValueError, match="StopStrings"):
        nanoseek.generate(model, [[1, 2]], 3, stop=["\n"])


def test_start_after_a_stop_that_timed_out_never_runs_two_engine_threads(model):
    """stop(timeout) forgot a thread still in its step, and start() then ran a second one: two
    threads stepping the same batch at once."""
    engine = Engine(model, max_batch_size=1, max_seq_len=32)
    step, active, overlaps = engine.step, [], []
    entered = threading.Event()

    def slow_step():
        active.append(1)
        overlaps.append(len(active) > 1)
        entered.set()
        threading.Event().wait(0.1)
        step()
        active.pop()

    engine.step = slow_step
    engine.start()
    request = engine.submit([1, 2], max_new_tokens=4, stop_token_ids=[])
    assert entered.wait(10)
    engine.stop(timeout=0.01)  # returns while the thread is still in its step
    engine.start()
    assert request.wait(20)
    engine.stop()
    assert not any(overlaps)


@pytest.mark.parametrize("limit", ["max_seq_len", "max_cached_tokens"])
def test_a_zero_context_or_cache_budget_is_refused_not_read_as_the_default(limit):
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=0)
    with pytest.raises(ValueError, match=limit):
        Engine(model, max_batch_size=1, **{limit: 0})


def test_generate_and_stream_give_a_training_model_its_mode_back():
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=0).train()
    nanoseek.generate(model, [[1, 2, 3]], max_new_tokens=2)
    assert model.training  # was left in eval mode, silently changing a training loop that samples from its model
    list(stream(model, [[1, 2, 3]], max_new_tokens=2))
    assert model.training
    model.eval()
    nanoseek.generate(model, [[1, 2, 3]], max_new_tokens=2)
    assert not model.training


def test_stop_called_from_an_event_callback_stops_the_engine_thread():
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=0)
    engine = Engine(model, max_batch_size=1, max_seq_len=64)
    errors = []

    def on_event(event):
        try:
            engine.stop()  # on the engine's thread: it raised "cannot join current thread"
        except Exception as e:
            errors.append(e)

    engine.start()
    engine.submit([1, 2, 3], SamplingParams(), max_new_tokens=4, on_event=on_event)
    thread = engine._thread
    thread.join(timeout=30)
    assert not errors and not thread.is_alive()
