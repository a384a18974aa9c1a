"""MTP speculative decoding: greedy output identical to plain greedy, sampled output with the same distribution."""

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.inference import Engine, SamplingParams
from nanoseek.inference.sampling import SamplingBatch
from nanoseek.inference.speculative import accept

PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [8, 1, 250], [61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]


@pytest.fixture(scope="module")
def random_model():
    return nanoseek.build_model(nanoseek.get_preset("test"), seed=3).eval()


@pytest.fixture(scope="module")
def pattern_model():
    """A test-size model trained for a few seconds, with MTP, on arithmetic progressions mod 64,
    so its drafts are mostly right and verification has something to accept."""
    config = nanoseek.get_preset("test").replace(vocab_size=64)
    model = nanoseek.build_model(config, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(70):
        start = torch.randint(0, 64, (32, 1), generator=generator)
        stride = torch.randint(1, 6, (32, 1), generator=generator)
        seq = (start + stride * torch.arange(25)) % 64
        ids, labels = seq[:, :-1], seq[:, 1:]
        logits, hidden = model(ids, return_hidden=True)
        mtp_logits = model.mtp_forward(hidden, ids)[0]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        loss = loss + F.cross_entropy(mtp_logits.flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def progressions(n):
    return [[(a + b * i) % 64 for i in range(4 + n % 5)] for a, b in zip(range(3, 3 + 7 * n, 7), [1, 2, 3, 4, 5] * n)]


@pytest.mark.parametrize("draft_tokens", [1, 2, 3])
def test_speculative_greedy_equals_plain_greedy(random_model, pattern_model, draft_tokens):
    for model, prompts in ((random_model, PROMPTS), (pattern_model, progressions(4))):
        for kwargs in (dict(), dict(repetition_penalty=1.5)):
            plain = nanoseek.generate(model, prompts, 24, stop_token_ids=[], **kwargs)
            spec = nanoseek.generate(model, prompts, 24, stop_token_ids=[], speculative=draft_tokens, **kwargs)
            assert spec == plain


@pytest.mark.parametrize("draft_tokens", [3, 4, 6])
def test_every_draft_accepted_up_to_the_last_cache_position(draft_tokens):
    """Recursive drafts write past the verified rows (up to n + 2k - 1): with every draft accepted
    and a request that fills max_seq_len exactly, they must still fit in the cache."""
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=0).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # equal logits: main model and drafts all pick token 0
    max_seq_len, new = 32, 2 + 3 * (draft_tokens + 1)  # the last step starts one token short
    engine = Engine(model, max_batch_size=1, max_seq_len=max_seq_len, speculative=draft_tokens)
    request = engine.submit(list(range(1, max_seq_len - new + 1)), SamplingParams(), max_new_tokens=new,
                            stop_token_ids=[])
    engine.run_until_done()
    assert (request.finish_reason, request.tokens) == ("length", [0] * new)
    assert engine.counters["accepted_tokens"] == engine.counters["drafted_tokens"] > 0


def test_drafts_are_accepted_on_a_learnable_pattern(pattern_model):
    _, stats = nanoseek.generate(pattern_model, progressions(6), 32, stop_token_ids=[], speculative=1,
                                 return_stats=True)
    assert stats["first_draft_acceptance"] > 0.8
    assert stats["tokens_per_forward"] > 1.8
    _, stats3 = nanoseek.generate(pattern_model, progressions(6), 32, stop_token_ids=[], speculative=3,
                                  return_stats=True)
    assert stats3["tokens_per_forward"] > stats["tokens_per_forward"]  # the module reused recursively helps


def test_first_draft_equals_mtp_on_the_whole_sequence(random_model):
    """The incrementally cached MTP module drafts what model.mtp_forward computes from scratch."""
    engine = Engine(random_model, max_batch_size=3, max_seq_len=64, speculative=2)
    requests = [engine.submit(p, max_new_tokens=12, stop_token_ids=[]) for p in PROMPTS]
    checked = 0
    while engine.has_work:
        engine.step()
        for row, request in enumerate(engine.running):
            ids = torch.tensor([request.prompt + request.tokens])
            with torch.no_grad():
                _, hidden = random_model(ids, return_hidden=True)
                expected = random_model.mtp_forward(hidden, ids)[0][0, -1].argmax().item()
            assert engine.drafts[row, 0].item() == expected
            checked += 1
    assert checked > 10 and all(len(r.tokens) == 12 for r in requests)


def chi_square(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = samples.numel() * probs.double()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()


def test_rejection_sampling_keeps_the_target_distribution():
    """accept() on fixed target and draft distributions: the output follows the target exactly."""
    torch.manual_seed(0)
    n, k = 60000, 2  # over a vocabulary of 5
    p = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05], [0.05, 0.05, 0.5, 0.1, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]])
    q = torch.tensor([[0.1, 0.1, 0.2, 0.3, 0.3], [0.3, 0.0, 0.3, 0.2, 0.2]])
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, seed=i) for i in range(n)])
    drafts = torch.stack([torch.multinomial(q[j], n, replacement=True) for j in range(k)], dim=1)
    pos = torch.arange(k + 1).expand(n, k + 1) + 10
    n_accepted, tokens = accept(p.expand(n, -1, -1), q.expand(n, -1, -1), drafts, s, pos)
    # 0.999 quantile of chi-square with 4 degrees of freedom is 18.5
    assert chi_square(tokens[:, 0], p[0]) < 18.5
    second = tokens[n_accepted >= 1, 1]
    assert chi_square(second, p[1]) < 18.5
    assert abs((n_accepted >= 1).double().mean().item() - torch.minimum(p[0], q[0]).sum().item()) < 0.01


def test_speculative_sampling_matches_the_model_distribution():
    """End to end on a 16-token vocabulary: the marginals of the 2nd and 3rd generated tokens, over
    thousands of seeds, match the exact ones computed from the model's conditionals."""
    config = nanoseek.get_preset("test").replace(vocab_size=16, initializer_range=0.2)
    model = nanoseek.build_model(config, seed=4).eval()
    prompt, n, V = [3, 9, 1], 4000, 16
    kwargs = dict(temperature=1.0, top_k=12, stop_token_ids=[])
    outputs, stats = nanoseek.generate(model, [prompt] * n, 3, seed=0, speculative=2, return_stats=True, **kwargs)
    assert 0.1 < stats["acceptance_rate"] < 0.95  # both branches of the rejection rule ran
    tokens = torch.tensor(outputs)
    with torch.no_grad():
        def conditional(prefixes):  # (N, T) -> next-token distribution after top-k 12, (N, V)
            logits = model(prefixes)[:, -1]
            kth = logits.topk(12, dim=-1).values[:, -1:]
            return logits.masked_fill(logits < kth, float("-inf")).softmax(-1).double()

        p1 = conditional(torch.tensor([prompt]))[0]
        pairs = torch.tensor([prompt + [a] for a in range(V)])
        p2_given_1 = conditional(pairs)  # (V, V)
        triples = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3_given_12 = conditional(triples).view(V, V, V)
    p2 = p1 @ p2_given_1
    p3 = torch.einsum("a,ab,abc->c", p1, p2_given_1, p3_given_12)
    # 0.999 quantile of chi-square with 11..15 degrees of freedom is at most 37.7
    assert chi_square(tokens[:, 0], p1) < 37.7
    assert chi_square(tokens[:, 1], p2) < 37.7
    assert chi_square(tokens[:, 2], p3) < 37.7
