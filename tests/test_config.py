"""ModelConfig: field types are checked, bad paths are named, config.json is written as transformers reads it."""

import json

import pytest

from nanoseek import ConfigError, ModelConfig, get_preset


@pytest.mark.parametrize("field", ["tie_word_embeddings", "norm_topk_prob", "rope_interleave", "attention_bias"])
@pytest.mark.parametrize("value", ["False", "true", 0, 1])
def test_yes_no_fields_need_json_booleans(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'.*true or false"):
        ModelConfig.from_dict(get_preset("test").to_dict() | {field: value})


@pytest.mark.parametrize("field", ["q_lora_rank", "num_experts_per_tok", "n_group", "topk_group", "hidden_size",
                                   "bos_token_id", "eos_token_id", "routed_scaling_factor"])
def test_a_boolean_is_not_a_number(field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_dict(get_preset("test").to_dict() | {field: True})


def test_null_yes_no_fields_read_as_false():
    """transformers treats a null switch as off; so must we, rather than refuse a released config."""
    raw = get_preset("test").to_dict() | {"norm_topk_prob": None, "tie_word_embeddings": None, "attention_bias": None}
    config = ModelConfig.from_dict(raw)
    assert (config.norm_topk_prob, config.tie_word_embeddings, config.attention_bias) == (False, False, False)


@pytest.mark.parametrize("rope_scaling", [{"factor": 40}, {"type": None, "factor": 4}])
def test_rope_scaling_without_a_kind_is_refused(rope_scaling):
    with pytest.raises(ConfigError, match="rope_scaling.*'type'"):
        ModelConfig.from_dict(get_preset("test").to_dict() | {"rope_scaling": rope_scaling})


def test_from_json_names_unreadable_paths(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config .*nonexistent.json"):
        ModelConfig.from_json(tmp_path / "nonexistent.json")
    with pytest.raises(ConfigError, match=f"cannot read config {tmp_path}"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "bad.json").write_text('{"vocab_size": ')
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        ModelConfig.from_json(tmp_path / "bad.json")


def test_dense_model_is_written_with_every_layer_dense():
    """transformers decides MoE layers by first_k_dense_replace alone, not by n_routed_experts."""
    config = get_preset("test").replace(n_routed_experts=0)
    written = config.to_dict()
    assert written["first_k_dense_replace"] == config.num_hidden_layers
    back = ModelConfig.from_dict(json.loads(json.dumps(written)))
    assert [back.is_moe_layer(i) for i in range(4)] == [config.is_moe_layer(i) for i in range(4)] == [False] * 4


def test_moe_layer_freq_is_written_as_first_moe_layer_when_that_says_the_same():
    # layers 0, 1 dense, 2 MoE; MTP module at index 3 dense (3 % 2): both survive the rewrite
    config = get_preset("test").replace(num_hidden_layers=3, first_k_dense_replace=1, moe_layer_freq=2)
    written = config.to_dict()
    assert written["first_k_dense_replace"] == 2
    back = ModelConfig.from_dict(written)
    assert [back.is_moe_layer(i) for i in range(4)] == [config.is_moe_layer(i) for i in range(4)]
    assert config.transformers_mismatches() == []
    spread = get_preset("test").replace(num_hidden_layers=3, first_k_dense_replace=0, moe_layer_freq=2)
    assert "moe_layer_freq" in " ".join(spread.transformers_mismatches())


def test_model_type_follows_the_router():
    """transformers' V3 routes only by noaux_tc and its V2 only by softmax greedy / group-limited greedy."""
    v2_router = get_preset("test").replace(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False)
    assert v2_router.to_dict()["model_type"] == "deepseek_v2"
    assert v2_router.to_dict()["architectures"] == ["DeepseekV2ForCausalLM"]
    assert get_preset("test").replace(model_type="deepseek_v2").to_dict()["model_type"] == "deepseek_v3"
    lite = get_preset("deepseek-v2-lite")
    assert lite.to_dict()["model_type"] == "deepseek_v2" and lite.transformers_mismatches() == []
    assert get_preset("deepseek-v3").transformers_mismatches() == []
    neither = get_preset("test").replace(topk_method="greedy")  # sigmoid scores: no class computes it
    assert neither.to_dict()["model_type"] == "deepseek_v3"
    problems = neither.transformers_mismatches()
    assert any("'topk_method'" in p for p in problems) and any("'scoring_func'" in p for p in problems)


def test_to_json_warns_about_what_transformers_cannot_compute(tmp_path):
    with pytest.warns(UserWarning, match="moe_layer_freq"):
        get_preset("test").replace(num_hidden_layers=3, first_k_dense_replace=0, moe_layer_freq=2).to_json(
            tmp_path / "config.json")
