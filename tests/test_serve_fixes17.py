"""Stop 22's serving fix: after the engine process dies, /metrics no longer reports its last gauges."""

import multiprocessing
import types

from nanoseek.inference.engine import RequestLimits
from nanoseek.serve.metrics import Metrics
from nanoseek.serve.worker import RemoteEngine


def test_a_dead_engine_reports_nothing_running_waiting_or_cached():
    ours, theirs = multiprocessing.Pipe()
    limits = RequestLimits(vocab_size=64, max_seq_len=32, max_cached_tokens=32, draft_tokens=0, eos_token_ids=(1,))
    stats = {"running": 3, "waiting": 2, "max_batch_size": 4, "cached_tokens": 120, "steps": 17, "prefills": 5,
             "busy_seconds": 1.5, "prefill_seconds": 0.5}
    info = {"config": None, "limits": limits, "max_batch_size": 4, "stats": stats}
    engine = RemoteEngine(types.SimpleNamespace(is_alive=lambda: True), ours, info, tokenizer=None)
    assert engine.stats()["running"] == 3  # what the child last sent
    engine._fail_all("the engine process exited")
    after = engine.stats()
    assert (after["running"], after["waiting"], after["cached_tokens"]) == (0, 0, 0)
    assert (after["steps"], after["prefills"]) == (17, 5)  # counters keep their totals
    text = Metrics().render(after)
    assert "nanoseek_running_requests 0" in text and "nanoseek_cached_tokens 0" in text
    ours.close()
    theirs.close()
