"""Model internals: absorbed MLA equals plain MLA, grouped experts equal a simple loop, routing rules."""

import pytest
import torch

from nanoseek import build_model, get_preset
from nanoseek.model.moe import Experts, MoE, Router
from nanoseek.model.params import count_parameters


def test_absorbed_mla_equals_plain():
    for overrides in ({}, {"q_lora_rank": None}, {"rope_interleave": False},
                      {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                        "mscale": 0.707, "mscale_all_dim": 0.707}}):
        config = get_preset("test").replace(**overrides)
        model = build_model(config, seed=3, dtype=torch.float64).eval()
        attn = model.model.layers[0].self_attn
        x = torch.randn(2, 17, config.hidden_size, dtype=torch.float64)
        cos, sin = model.rotary(torch.arange(17).unsqueeze(0))
        plain = attn(x, cos, sin)
        absorbed = attn.forward_absorbed(x, cos, sin)
        assert (plain - absorbed).abs().max().item() < 1e-10, overrides


def test_absorbed_mla_with_padding_mask_matches_plain():
    config = get_preset("test")
    attn = build_model(config, seed=0, dtype=torch.float64).model.layers[0].self_attn
    model_rotary = build_model(config, seed=0).rotary
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    cos, sin = model_rotary(torch.arange(9).unsqueeze(0))
    mask = torch.ones(9, 9, dtype=torch.bool).tril().repeat(2, 1, 1)
    mask[1, :, :3] = False  # the second row is left-padded by three tokens
    mask[1, torch.arange(3), torch.arange(3)] = True  # padding rows attend to themselves only
    plain = attn(x, cos.double(), sin.double(), mask)
    absorbed = attn.forward_absorbed(x, cos.double(), sin.double(), mask)
    assert (plain - absorbed).abs().max().item() < 1e-10


@pytest.mark.parametrize("T", [1, 64, 130])
def test_blocked_causal_attention_equals_sdpa_with_gradients(T, monkeypatch):
    from nanoseek.model import attention

    monkeypatch.setattr(attention, "ATTENTION_BLOCK_VALUES", 64 * T)  # one head per block: the split path too
    q, k = (torch.randn(2, 3, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 3, T, 8, dtype=torch.float64, requires_grad=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    got = attention.blocked_causal_attention(q, k, v, 0.3)
    assert (got - want).abs().max().item() < 1e-12
    grad = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert (g - w).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_attention_and_norm_equal_their_fp32_softmax_and_norm(dtype):
    """The blocked attention's softmax and RMSNorm take bf16/fp16 as they are, trusting the CPU kernels
    to compute in fp32 and round once: the same bits as an explicit fp32 copy."""
    from nanoseek.model import attention
    from nanoseek.model.layers import RMSNorm

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 130, 16) for _ in range(3))
    want = attention.blocked_causal_attention(q, k, v, 0.3).to(dtype)  # fp32 all the way
    got = attention.blocked_causal_attention(q.to(dtype), k.to(dtype), v.to(dtype), 0.3)
    assert (got.float() - want.float()).abs().max().item() < 2e-2
    scores = torch.randn(4, 64, 130).to(dtype) * 4
    scores[..., 100:] = float("-inf")
    assert torch.equal(scores.softmax(-1), scores.float().softmax(-1).to(dtype))
    for dim in (7, 64, 100, 256, 1536):
        norm = RMSNorm(dim)
        torch.nn.init.normal_(norm.weight)
        norm = norm.to(dtype)
        x = (torch.randn(3, 5, dim) * 3).to(dtype)
        want = norm.weight * torch.nn.functional.rms_norm(x.float(), (dim,), eps=norm.eps).to(dtype)
        assert torch.equal(norm(x), want), dim


def test_blocked_attention_leaves_long_training_sequences_to_flash(monkeypatch):
    from nanoseek.model import attention

    monkeypatch.setattr(attention, "ATTENTION_SAVED_VALUES", 2 * 3 * 64 * 64 // 2)
    fits, too_long = torch.empty(2, 3, 64, 8), torch.empty(2, 3, 65, 8)
    assert attention._use_blocked_attention(fits) and not attention._use_blocked_attention(too_long)
    with torch.no_grad():  # nothing is kept for a backward pass: any length
        assert attention._use_blocked_attention(too_long)


def _loop_reference(experts: Experts, x, idx, weight):
    out = torch.zeros_like(x)
    I = experts.inter
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k].item()
            gate, up = x[t] @ experts.gate_up_proj[e, :, :I], x[t] @ experts.gate_up_proj[e, :, I:]
            out[t] += weight[t, k] * ((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e])
    return out


@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("hidden", [64, 30])  # 30: rows not 16-byte aligned, so no grouped kernel
def test_grouped_experts_equal_simple_loop(tokens, hidden):
    config = get_preset("test").replace(hidden_size=hidden)
    moe = build_model(config, seed=1).model.layers[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(tokens, hidden)
    idx, weight, _ = moe.gate(x)
    got = moe.experts(x, idx, weight)
    want = _loop_reference(moe.experts, x, idx, weight)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [12, 40])
def test_bf16_inference_takes_the_padded_path_and_equals_the_loop(tokens, monkeypatch):
    config = get_preset("test")
    moe = build_model(config, seed=1).model.layers[1].mlp.to(torch.bfloat16)
    x = torch.randn(tokens, config.hidden_size).to(torch.bfloat16)
    idx, weight, _ = moe.gate(x)
    taken, padded = [], Experts._padded

    def spy(self, *args):
        taken.append(args[0].shape[0])
        return padded(self, *args)

    monkeypatch.setattr(Experts, "_padded", spy)
    with torch.no_grad():
        got = moe.experts(x, idx, weight).float()
    assert taken == [tokens * config.num_experts_per_tok]
    want = _loop_reference(moe.experts.float(), x.float(), idx, weight.float())
    assert (got - want).abs().max().item() < 0.02 * want.abs().max().item()


def test_grouped_experts_gradients_equal_loop():
    config = get_preset("test")
    moe = build_model(config, seed=2).model.layers[1].mlp
    x = torch.randn(48, config.hidden_size, requires_grad=True)
    idx, weight, _ = moe.gate(x.detach())
    weight = weight.detach()
    moe.experts(x, idx, weight).pow(2).sum().backward()
    grads = [x.grad.clone(), moe.experts.gate_up_proj.grad.clone(), moe.experts.down_proj.grad.clone()]
    x.grad = None
    moe.zero_grad()
    _loop_reference(moe.experts, x, idx, weight).pow(2).sum().backward()
    for got, want in zip(grads, [x.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad]):
        assert (got - want).abs().max().item() < 1e-4


def test_bias_chooses_experts_but_does_not_weight_them():
    config = get_preset("test").replace(n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(5, config.hidden_size)
    idx0, w0, scores = router(x)
    router.e_score_correction_bias[3] = 10.0  # expert 3 now always chosen
    idx1, w1, _ = router(x)
    assert (idx1 == 3).any(dim=1).all()
    chosen = (idx1 == 3).nonzero()[:, 0]
    assert torch.allclose(w1[idx1 == 3], scores[chosen, 3])  # gate weight is the unbiased score


def test_group_limited_routing_only_uses_top_groups():
    config = get_preset("test")  # 8 experts in 4 groups, 2 groups kept, top-2
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(200, config.hidden_size)
    idx, weight, scores = router(x)
    group_of = idx // 2
    group_score = scores.view(200, 4, 2).topk(2, dim=-1).values.sum(-1)
    allowed = group_score.topk(2, dim=-1).indices
    for t in range(200):
        assert set(group_of[t].tolist()) <= set(allowed[t].tolist())
    assert torch.allclose(weight.sum(-1), torch.full((200,), config.routed_scaling_factor))


def test_negative_bias_masking_uses_minus_infinity():
    """With -inf masking an excluded group's expert is never picked, even if eligible ones score below 0."""
    config = get_preset("test").replace(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.1)
    router.e_score_correction_bias.fill_(-5.0)  # every biased score is negative
    x = torch.randn(50, config.hidden_size)
    idx, _, _ = router(x)
    assert (idx[:, 0] // 2 == idx[:, 1] // 2).all()  # both from the single kept group


@pytest.mark.parametrize("preset", ["test", "tiny", "small", "medium"])
def test_param_count_matches_model(preset):
    config = get_preset(preset)
    model = build_model(config)
    counts = count_parameters(config)
    tensors = dict(model.named_parameters()) | {k: b for k, b in model.named_buffers() if "e_score" in k}
    main = sum(t.numel() for name, t in tensors.items() if not name.startswith("mtp."))
    mtp = sum(t.numel() for name, t in tensors.items() if name.startswith("mtp."))
    assert (main, mtp) == (counts["total"], counts["mtp_total"])


def test_deepseek_v3_param_counts():
    c = count_parameters(get_preset("deepseek-v3"))
    assert round(c["total"] / 1e9, 1) == 671.0
    assert 37.5e9 <= c["activated"] < 37.6e9
    assert round(c["mtp_total"] / 1e9, 1) == 11.6
    assert round(c["checkpoint_total"] / 1e9, 1) == 684.5
    lite = count_parameters(get_preset("deepseek-v2-lite"))
    assert round(lite["total"] / 1e9, 1) == 15.7


def test_mtp_forward_shapes_and_targets():
    config = get_preset("test").replace(num_nextn_predict_layers=2)
    model = build_model(config)
    ids = torch.randint(0, config.vocab_size, (2, 12))
    logits, hidden = model(ids, return_hidden=True)
    outs = model.mtp_forward(hidden, ids)
    assert [o.shape for o in outs] == [(2, 11, config.vocab_size), (2, 10, config.vocab_size)]
    # module 1 at row i sees tokens up to i+1 only: changing token i+2 leaves row i unchanged
    ids2 = ids.clone()
    ids2[:, 6] = (ids2[:, 6] + 1) % config.vocab_size
    logits2, hidden2 = model(ids2, return_hidden=True)
    outs2 = model.mtp_forward(hidden2, ids2)
    assert torch.allclose(outs[0][:, :5], outs2[0][:, :5], atol=1e-6)
    assert not torch.allclose(outs[0][:, 5], outs2[0][:, 5])
