"""Cached generation against full recomputation, and the sampling rules, on a tiny random model."""

import dataclasses
import math

import pytest
import torch

import nanoseek
from compile_checks import no_compile_fallback
from nanoseek.inference import LatentCache, SamplingParams
from nanoseek.inference.forward import CacheView, model_forward
from nanoseek.inference.sampling import SamplingBatch, filter_logits, sample, uniform_noise

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 1, 250], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return nanoseek.build_model(nanoseek.get_preset("test"), seed=1).eval()


def full_greedy(model, prompt, steps):
    """Greedy continuation by recomputing the whole sequence each step, and each step's logits."""
    ids, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(model(ids)[0, -1])
            ids = torch.cat([ids, logits[-1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), logits


def test_cached_decode_equals_full_recomputation(model):
    prompt, steps = PROMPTS[0], 12
    tokens, ref_logits = full_greedy(model, prompt, steps)
    cache = CacheView(LatentCache(model.config, 1, 64).kv, 0, 64)
    with torch.no_grad():
        hidden = model_forward(model, cache, torch.tensor([prompt]), torch.arange(len(prompt))[None], plain=True)
        logits = model.lm_head(hidden[:, -1])
        got = []
        for step in range(steps):
            assert (logits[0] - ref_logits[step]).abs().max().item() < 1e-5
            got.append(logits[0].argmax().item())
            pos = torch.tensor([[len(prompt) + step]])
            logits = model.lm_head(model_forward(model, cache, torch.tensor([[got[-1]]]), pos)[:, -1])
    assert got == tokens
    assert nanoseek.generate(model, [prompt], steps, stop_token_ids=[]) == [tokens]


def test_absorbed_equals_plain(model):
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 10, model.config.hidden_size)
    cos, sin = model.rotary(torch.arange(10)[None])
    with torch.no_grad():
        plain, absorbed = attn(x, cos, sin), attn.forward_absorbed(x, cos, sin)
    assert (plain - absorbed).abs().max().item() < 1e-5 * plain.abs().max().item() + 1e-7
    # a whole prefill both ways: same hidden states, same cache contents
    ids = torch.tensor([PROMPTS[2]])
    pos = torch.arange(ids.shape[1])[None]
    caches = [LatentCache(model.config, 1, 16) for _ in range(2)]
    with torch.no_grad():
        h_plain = model_forward(model, CacheView(caches[0].kv, 0, 16), ids, pos, plain=True)
        h_absorbed = model_forward(model, CacheView(caches[1].kv, 0, 16), ids, pos, plain=False)
    assert (h_plain - h_absorbed).abs().max().item() < 1e-5
    assert (caches[0].kv - caches[1].kv).abs().max().item() < 1e-5


def test_cache_holds_only_the_latent():
    config = nanoseek.get_preset("tiny")
    for dtype in (torch.float32, torch.bfloat16):
        cache = LatentCache(config, n_slots=2, max_len=32, dtype=dtype)
        size = torch.tensor([], dtype=dtype).element_size()
        assert cache.bytes_per_token_per_layer == (config.kv_lora_rank + config.qk_rope_head_dim) * size
        assert cache.nbytes == cache.bytes_per_token_per_layer * 2 * 32 * (config.num_hidden_layers + 1)


def test_padded_batch_equals_one_by_one(model):
    settings = [dict(), dict(temperature=0.9, top_p=0.95, seed=11, repetition_penalty=1.2)]
    for kwargs in settings:
        batched = nanoseek.generate(model, PROMPTS, 16, stop_token_ids=[], **kwargs)
        for i, prompt in enumerate(PROMPTS):
            alone = dict(kwargs, seed=kwargs["seed"] + i) if "seed" in kwargs else kwargs
            assert nanoseek.generate(model, [prompt], 16, stop_token_ids=[], **alone) == [batched[i]]
    greedy = nanoseek.generate(model, PROMPTS, 16, stop_token_ids=[])
    assert greedy == [full_greedy(model, p, 16)[0] for p in PROMPTS]


def test_top_k_1_equals_greedy(model):
    greedy = nanoseek.generate(model, PROMPTS, 12, stop_token_ids=[])
    assert nanoseek.generate(model, PROMPTS, 12, temperature=1.5, top_k=1, seed=0, stop_token_ids=[]) == greedy


def test_seed_reproduces(model):
    kwargs = dict(temperature=1.0, top_k=50, seed=1234, stop_token_ids=[])
    first = nanoseek.generate(model, PROMPTS, 20, **kwargs)
    assert nanoseek.generate(model, PROMPTS, 20, **kwargs) == first
    assert nanoseek.generate(model, PROMPTS, 20, **dict(kwargs, seed=99)) != first
    # unseeded sampling follows torch's global generator
    torch.manual_seed(5)
    a = nanoseek.generate(model, PROMPTS, 20, temperature=1.0, stop_token_ids=[])
    torch.manual_seed(5)
    assert nanoseek.generate(model, PROMPTS, 20, temperature=1.0, stop_token_ids=[]) == a
    # the largest seed: later prompts' seed + i wraps around as the server's does, not an error
    last = nanoseek.generate(model, PROMPTS[:2], 5, **dict(kwargs, seed=2**63 - 1))
    assert nanoseek.generate(model, PROMPTS[1:2], 5, **dict(kwargs, seed=0)) == last[1:]


def test_stop_tokens_and_stop_callable(model):
    free = nanoseek.generate(model, [PROMPTS[0]], 12, stop_token_ids=[])[0]
    stop_at = free[5]
    cut = free.index(stop_at)
    assert nanoseek.generate(model, [PROMPTS[0]], 12, stop_token_ids=[stop_at])[0] == free[:cut]
    stopped = nanoseek.generate(model, [PROMPTS[0]], 12, stop_token_ids=[], stop=lambda tokens: len(tokens) == 3)
    assert stopped[0] == free[:3]


def test_streaming_yields_the_same_tokens(model):
    streamed = [[] for _ in PROMPTS]
    for index, tokens in nanoseek.inference.stream(model, PROMPTS, 9, stop_token_ids=[]):
        streamed[index] += tokens
    assert streamed == nanoseek.generate(model, PROMPTS, 9, stop_token_ids=[])


def test_bad_input_is_named(model):
    with pytest.raises(ValueError, match="prompt is empty"):
        nanoseek.generate(model, [[]], 4)
    with pytest.raises(ValueError, match="prompt token 256"):
        nanoseek.generate(model, [[1, 256]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        nanoseek.generate(model, [[1]], 0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    # top_k and seed become int64 tensors: beyond that they would fail the whole batch at its next step
    for field, value in [("top_k", 2**63), ("top_k", 2**70), ("seed", 2**63), ("seed", -1)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(temperature=1.0, **{field: value})
    assert SamplingParams(top_k=2**63 - 1, seed=2**63 - 1).top_k == 2**63 - 1
    with pytest.raises(ValueError, match="list of token-id lists"):
        nanoseek.generate(model, [1, 2, 3], 4)


def test_a_tiny_temperature_is_greedy(model):
    """logits / 1e-40 overflows fp32 to inf (it gave token 0 forever): below 1e-5 a row is greedy."""
    greedy = nanoseek.generate(model, PROMPTS, 8, stop_token_ids=[])
    for kwargs in ({}, dict(top_p=0.9), dict(speculative=True)):
        assert nanoseek.generate(model, PROMPTS, 8, temperature=1e-40, seed=0, stop_token_ids=[], **kwargs) == greedy
    assert SamplingParams(temperature=9e-6).greedy and not SamplingParams(temperature=1e-5).greedy


def test_filters_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log().view(1, 1, -1)

    def kept(**kwargs):
        s = SamplingBatch.from_params([SamplingParams(temperature=1.0, **kwargs)])
        return torch.isfinite(filter_logits(logits, s))[0, 0].nonzero().flatten().tolist()

    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.7) == [0, 1]  # 0.5 + 0.2 reaches 0.7
    assert kept(top_p=0.71) == [0, 1, 2]
    assert kept(min_p=0.25) == [0, 1, 2]  # 0.15 >= 0.25 * 0.5
    assert kept(top_k=3, top_p=0.5 / 0.85 + 0.01) == [0, 1]  # top-p on the top-k renormalised distribution
    assert kept() == [0, 1, 2, 3, 4]


def test_repetition_penalty_matches_transformers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    seen_ids = torch.tensor([[3, 7, 7, 20], [0, 1, 2, 49]])
    ref = transformers.RepetitionPenaltyLogitsProcessor(1.3)(seen_ids, logits.clone())
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter(1, seen_ids, True)
    s = SamplingBatch.from_params([SamplingParams(repetition_penalty=1.3)] * 2)
    from nanoseek.inference.sampling import process_logits

    assert torch.allclose(process_logits(logits.unsqueeze(1), s, seen.unsqueeze(1))[:, 0], ref)


@pytest.mark.parametrize("penalty", [1e-40, 1e-7, 1e7, 1e300])
def test_a_repetition_penalty_whose_penalised_logits_overflow_is_refused(penalty):
    """1e-40 rounds to 0 in fp32, so positive seen logits became inf and speculative sampling's
    probabilities NaN; 1e300 rounds to inf."""
    from nanoseek.inference.sampling import SamplingError

    with pytest.raises(SamplingError, match="repetition_penalty") as error:
        SamplingParams(repetition_penalty=penalty)
    assert error.value.param == "repetition_penalty"
    for ok in (1e-6, 1e6):
        s = SamplingBatch.from_params([SamplingParams(repetition_penalty=ok, temperature=1.0)])
        from nanoseek.inference.sampling import probabilities

        probs = probabilities(torch.tensor([[[30.0, -30.0, 1.0]]]), s, torch.ones(1, 1, 3, dtype=torch.bool))
        assert torch.isfinite(probs).all()


def test_sampler_draws_from_softmax():
    """Gumbel-max with the counter-based noise: frequencies match softmax(logits / T)."""
    V, n = 6, 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    params = [SamplingParams(temperature=0.7, seed=i) for i in range(n)]
    s = SamplingBatch.from_params(params)
    drawn = sample(logits.expand(n, 1, V), s, None, torch.full((n, 1), 3))[:, 0]
    freq = torch.bincount(drawn, minlength=V).float() / n
    expected = (logits / 0.7).softmax(-1)
    # chi-square with 5 degrees of freedom; 20.5 is its 0.999 quantile
    chi2 = (n * (freq - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5, (freq, expected)
    u = uniform_noise(torch.arange(1000), torch.zeros(1000, 1, dtype=torch.long), 0, 64).flatten()
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.var().item() - 1 / 12) < 0.002 and not math.isnan(u.sum().item())


def test_compiled_decode_matches_eager(model):
    """Greedy, one prompt: the smallest artifact (~25 s to build on 2 busy cores; sampling doubles it)."""
    pytest.importorskip("torch._inductor")
    kwargs = dict(stop_token_ids=[])
    eager = nanoseek.generate(model, PROMPTS[:1], 8, **kwargs)
    with no_compile_fallback():
        compiled = nanoseek.generate(model, PROMPTS[:1], 8, compile=True, **kwargs)
    assert compiled == eager


def test_compiled_padded_batch_matches_eager(model):
    """Compiled steps run at a power-of-two batch: three rows run padded to four in the free slot, and
    a fourth request that later joins into that slot gets the tokens it gets alone."""
    pytest.importorskip("torch._inductor")
    from nanoseek.inference import Engine

    late = [40, 41, 42, 43, 44]
    alone = [nanoseek.generate(model, [p], n, stop_token_ids=[])[0] for p, n in zip(PROMPTS + [late], (10, 10, 10, 7))]
    engine = Engine(model, max_batch_size=4, max_seq_len=64, compile=True)
    with no_compile_fallback():
        requests = [engine.submit(p, max_new_tokens=10, stop_token_ids=[]) for p in PROMPTS]
        for _ in range(3):
            engine.step()
        requests.append(engine.submit(late, max_new_tokens=7, stop_token_ids=[]))
        engine.run_until_done()
    assert [r.result() for r in requests] == alone


def test_compiled_bf16_batch_of_8_follows_eager(model):
    """From 8 rows on, a bf16 artifact leaves its wider matmuls (the output head) to oneDNN instead of
    decomposing them (decode.BF16_WIDEST_DECOMPOSED_FROM_8_ROWS). bf16 rounds differently in each, and
    this random model's logits are close together, so tokens may part at near-ties: every compiled
    token must be the eager model's choice up to a bf16 rounding (a wrong head would miss by ~0.3)."""
    pytest.importorskip("torch._inductor")
    from nanoseek.inference.decode import WIDEST_DECOMPOSED, _widest_decomposed

    config = dataclasses.replace(nanoseek.get_preset("test"), vocab_size=1024)  # a head wider than the limit
    assert _widest_decomposed(8, torch.bfloat16) < config.vocab_size <= WIDEST_DECOMPOSED
    assert _widest_decomposed(4, torch.bfloat16) == _widest_decomposed(8, torch.float32) == WIDEST_DECOMPOSED
    bf16 = nanoseek.build_model(config, seed=1).to(torch.bfloat16).eval()
    prompts = [[(7 * i + j) % 200 + 3 for j in range(4 + i)] for i in range(8)]
    with no_compile_fallback():
        compiled = nanoseek.generate(bf16, prompts, 6, compile=True, stop_token_ids=[])
    with torch.no_grad():
        for prompt, tokens in zip(prompts, compiled):
            logits_TV = bf16(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1].float()
            chosen_T = logits_TV.gather(1, torch.tensor(tokens).unsqueeze(1)).squeeze(1)
            assert (logits_TV.max(dim=1).values - chosen_T).max() < 0.01, (prompt, tokens)


def test_compiled_steps_read_the_models_current_weights(model):
    """A compiled step holds no copy of the weights: after an in-place update (a training step, a
    new checkpoint loaded into the same model) it computes with the new ones, as eager does."""
    pytest.importorskip("torch._inductor")
    import copy

    model = copy.deepcopy(model)
    with no_compile_fallback():
        before = nanoseek.generate(model, PROMPTS[:1], 8, stop_token_ids=[], compile=True)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        after = nanoseek.generate(model, PROMPTS[:1], 8, stop_token_ids=[], compile=True)
    assert after == nanoseek.generate(model, PROMPTS[:1], 8, stop_token_ids=[]) and after != before
    # a freed model takes its compiled steps with it: they hold its tensors, which would otherwise leak
    import gc
    import weakref

    from nanoseek.inference import aot

    freed = weakref.ref(model)
    del model
    gc.collect()
    assert freed() is None and not [key for key in aot._ARTIFACTS if key[1]() is None]


def test_compiled_steps_are_kept_on_disk_and_reloaded(model):
    """A built step is written to the cache folder; a new process (here: the in-memory table emptied,
    building forbidden) loads it from there, bound to the model it is given, with the same tokens."""
    pytest.importorskip("torch._inductor")
    import copy

    from nanoseek.inference import aot, decode

    with no_compile_fallback():
        first = nanoseek.generate(model, PROMPTS[:1], 8, stop_token_ids=[], compile=True)
    assert list(aot.cache_dir().glob("decode_step-*.pt2"))

    def no_build(*args):
        raise AssertionError("built again instead of loading from the cache")

    saved_artifacts, saved_compile = dict(aot._ARTIFACTS), aot._compile
    aot._ARTIFACTS.clear()
    aot._compile = no_build
    try:
        with no_compile_fallback():
            again = nanoseek.generate(copy.deepcopy(model), PROMPTS[:1], 8, stop_token_ids=[], compile=True)
    finally:
        aot._compile = saved_compile
        aot._ARTIFACTS.update(saved_artifacts)
        decode._FAILED.clear()  # had it failed, the failure must not turn compiling off for later tests
    assert again == first


def test_the_compiled_step_cache_drops_the_least_recently_used_beyond_its_budget(tmp_path, monkeypatch):
    import os

    from nanoseek.inference import aot

    files = []
    for age, name in enumerate(["newest", "used", "old", "oldest"]):
        path = tmp_path / f"decode_step-{name}.pt2"
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1e9 - age * 100, 1e9 - age * 100))
        files.append(path)
    just_written = tmp_path / "decode_step-just-written.pt2"
    just_written.write_bytes(b"x" * 1000)
    os.utime(just_written, (1, 1))  # older than all (a coarse clock): still never the one deleted
    (tmp_path / "notes.txt").write_text("not an artifact")
    deleted = aot.prune_cache(tmp_path, just_written, budget=3000)
    assert sorted(p.name for p in deleted) == ["decode_step-old.pt2", "decode_step-oldest.pt2"]
    assert just_written.exists() and files[0].exists() and files[1].exists() and (tmp_path / "notes.txt").exists()
    assert aot.prune_cache(tmp_path, just_written, budget=10**6) == []  # under budget: nothing goes
    monkeypatch.setenv("NANOSEEK_CACHE_MB", "0.5")
    assert aot.cache_budget_bytes() == 2**19
    monkeypatch.setenv("NANOSEEK_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="NANOSEEK_CACHE_MB"):
        aot.cache_budget_bytes()


def test_compiled_steps_split_their_kernels_over_torchs_threads_unless_waiting_is_passive(monkeypatch):
    from nanoseek.inference import decode

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        batch1, batch8 = decode._aot_options(1)(1, torch.bfloat16), decode._aot_options(1)(8, torch.bfloat16)
        verify2 = decode._aot_options(2)(1, torch.float32)  # a speculative verify of 1 draft: 2 rows
        assert (batch1["cpp.threads"], batch8["cpp.threads"], verify2["cpp.threads"]) == (2, 2, 2)
        torch.set_num_threads(1)
        assert decode._aot_options(1)(8, torch.bfloat16)["cpp.threads"] == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
        assert decode._aot_options(1)(8, torch.bfloat16)["cpp.threads"] == 1
    finally:
        torch.set_num_threads(threads)
        decode._decompose_wide_matmuls()  # the options call set inductor's process-wide limits
