"""Helpers that build tiny random transformers DeepseekV3/V2 models, the reference nanoseek is tested against."""

import torch

BASE = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    n_routed_experts=8, num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6,
    initializer_range=0.08, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}


def make_hf_model(kind: str = "v3", seed: int = 0, **overrides):
    """A random transformers model; V3 routes with sigmoid + noaux_tc, V2 with softmax."""
    import transformers

    torch.manual_seed(seed)
    fields = {**BASE, **overrides}
    fields["num_key_value_heads"] = fields["num_attention_heads"]
    if kind == "v3":
        fields.setdefault("q_lora_rank", 24)
        fields.setdefault("first_k_dense_replace", 1)
        fields.setdefault("n_group", 4)
        fields.setdefault("topk_group", 2)
        fields.update(scoring_func="sigmoid", topk_method="noaux_tc")
        config = transformers.DeepseekV3Config(**fields)
        model = transformers.DeepseekV3ForCausalLM(config)
        with torch.no_grad():  # a non-zero correction bias, to test that it only chooses experts
            for layer in model.model.layers:
                if hasattr(layer.mlp, "gate"):
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    else:
        fields.setdefault("q_lora_rank", None)
        fields.setdefault("first_k_dense_replace", 1)
        fields.setdefault("n_shared_experts", 2)
        fields.setdefault("scoring_func", "softmax")
        config = transformers.DeepseekV2Config(**fields)
        model = transformers.DeepseekV2ForCausalLM(config)
    return model.eval()
