"""nanoseek against transformers' DeepseekV3/V2 on tiny random models: same logits, same greedy tokens."""

import pytest
import torch

import nanoseek
from hf_reference import YARN, make_hf_model

pytest.importorskip("transformers")

CASES = {
    "v3-qlora-dense1-groups": ("v3", {}),
    "v3-yarn": ("v3", {"rope_scaling": dict(YARN, mscale=1.0, mscale_all_dim=1.0)}),
    "v3-yarn-mscale": ("v3", {"rope_scaling": YARN}),
    "v3-no-dense-no-qlora": ("v3", {"first_k_dense_replace": 0, "q_lora_rank": None}),
    "v3-one-group-no-shared": ("v3", {"n_group": 1, "topk_group": 1, "n_shared_experts": 0}),
    "v3-no-norm-topk": ("v3", {"norm_topk_prob": False, "routed_scaling_factor": 1.5}),
    "v3-two-dense": ("v3", {"first_k_dense_replace": 2, "num_hidden_layers": 4, "tie_word_embeddings": True}),
    "v3-not-interleaved": ("v3", {"rope_interleave": False}),
    "v2-greedy": ("v2", {"topk_method": "greedy"}),
    "v2-group-limited": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                                "routed_scaling_factor": 2.0, "q_lora_rank": 24}),
    "v2-yarn-no-dense": ("v2", {"topk_method": "greedy", "first_k_dense_replace": 0, "rope_scaling": YARN}),
}


def greedy(model_fn, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt.clone()
    for _ in range(steps):
        ids = torch.cat([ids, model_fn(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = make_hf_model(kind, **overrides)
    hf.save_pretrained(tmp_path)
    model = nanoseek.load(tmp_path)
    assert model.dtype == torch.float32
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids)
        assert out.shape == ref.shape
        assert (out - ref).abs().max().item() < 1e-4
        prompt = ids[:1, :8]
        ref_tokens = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, 8:].tolist()
        assert greedy(model, prompt, 20) == ref_tokens


def test_save_then_transformers_loads_same_logits(tmp_path):
    import transformers

    hf = make_hf_model("v3", rope_scaling=YARN)
    hf.save_pretrained(tmp_path / "hf")
    model = nanoseek.load(tmp_path / "hf")
    nanoseek.save(model, tmp_path / "ns", max_shard_size="40KB")  # force several shards
    assert (tmp_path / "ns" / "model.safetensors.index.json").exists()
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ns").eval()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert (back(ids).logits - model(ids)).abs().max().item() < 1e-5
        for name, param in hf.state_dict().items():
            assert torch.equal(param, back.state_dict()[name]), name
    assert back.config.scoring_func == "sigmoid"


def test_v2_round_trip_through_transformers(tmp_path):
    import transformers

    hf = make_hf_model("v2", topk_method="group_limited_greedy", n_group=4, topk_group=2)
    hf.save_pretrained(tmp_path / "hf")
    nanoseek.save(nanoseek.load(tmp_path / "hf"), tmp_path / "ns")
    back = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "ns").eval()
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max().item() == 0.0


def test_bf16_load_runs_close_to_fp32(tmp_path):
    hf = make_hf_model("v3")
    hf.save_pretrained(tmp_path)
    model32 = nanoseek.load(tmp_path)
    model16 = nanoseek.load(tmp_path, dtype=torch.bfloat16)
    assert model16.dtype == torch.bfloat16
    assert model16.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router stays fp32
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model32(ids)[0], model16(ids)[0].float()
    # bf16 rounding may flip a near-tied expert choice at a token or two; the rest must agree closely
    per_token_error = (a - b).norm(dim=-1) / a.norm(dim=-1)
    assert per_token_error.median().item() < 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8


# nanoseek configs that transformers' classes spell differently: config.json must say it their way
SAVED_CASES = {
    "dense": {"n_routed_experts": 0},  # README: --set n_routed_experts=0
    "moe-layer-freq-suffix": {"num_hidden_layers": 3, "first_k_dense_replace": 1, "moe_layer_freq": 2},
    "v3-softmax-greedy-is-v2": {"topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False},
    "v3-softmax-group-limited-is-v2": {"topk_method": "group_limited_greedy", "scoring_func": "softmax",
                                       "norm_topk_prob": False},
    "v2-noaux-tc-is-v3": {"model_type": "deepseek_v2"},
    "top1-norm": {"num_experts_per_tok": 1},
}


@pytest.mark.parametrize("case", sorted(SAVED_CASES))
def test_saved_config_loads_in_transformers_with_same_logits(case, tmp_path):
    import warnings

    import transformers

    model = nanoseek.build_model(nanoseek.get_preset("test").replace(**SAVED_CASES[case]), seed=0).eval()
    with torch.no_grad():  # a trained router's correction bias is far from zero
        for module in model.modules():
            if getattr(module, "e_score_correction_bias", None) is not None:
                module.e_score_correction_bias.uniform_(-0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a faithful config.json is saved without a mismatch warning
        nanoseek.save(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() < 1e-5
    back = nanoseek.load(tmp_path)  # and nanoseek reads the same model back, MTP module included
    assert back.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


@pytest.mark.parametrize("overrides, field", [
    ({"num_hidden_layers": 3, "first_k_dense_replace": 0, "moe_layer_freq": 2}, "moe_layer_freq"),
    ({"topk_method": "greedy"}, "topk_method"),
    ({"topk_method": "group_limited_greedy"}, "topk_method"),
    ({"topk_method": "greedy", "scoring_func": "softmax"}, "norm_topk_prob"),
])
def test_save_warns_when_transformers_cannot_compute_the_model(overrides, field, tmp_path):
    model = nanoseek.build_model(nanoseek.get_preset("test").replace(**overrides), seed=0)
    with pytest.warns(UserWarning) as record:
        nanoseek.save(model, tmp_path / "m")
    messages = [str(w.message) for w in record]
    assert any(f"'{field}'" in m and "transformers will compute different logits" in m for m in messages), messages
