"""Checkpoint folders: FP8 block-scaled weights, sharding, and clear errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import CheckpointError, ConfigError, ModelConfig, build_model, get_preset


def _fp8_quantize(weight: torch.Tensor, block: int = 128):
    """DeepSeek-V3's release format: e4m3 values and one fp32 scale per 128x128 block."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    scale = torch.empty(rows, cols)
    quant = torch.empty(out_dim, in_dim, dtype=torch.float8_e4m3fn)
    for r in range(rows):
        for c in range(cols):
            tile = weight[r * block:(r + 1) * block, c * block:(c + 1) * block].float()
            s = tile.abs().max().clamp(min=1e-12) / 448.0
            scale[r, c] = s
            quant[r * block:(r + 1) * block, c * block:(c + 1) * block] = (tile / s).to(torch.float8_e4m3fn)
    return quant, scale


def test_fp8_block_scaled_checkpoint_loads_within_fp8_rounding(tmp_path):
    config = get_preset("test").replace(hidden_size=192, q_lora_rank=160, intermediate_size=272,
                                        moe_intermediate_size=136, num_nextn_predict_layers=0)
    model = build_model(config, seed=0)
    nanoseek.save(model, tmp_path / "bf")
    tensors = load_file(tmp_path / "bf" / "model.safetensors")
    quantized = {}
    for key, value in tensors.items():
        is_linear = value.ndim == 2 and "embed" not in key and "lm_head" not in key and "mlp.gate.weight" not in key
        if is_linear:
            q, s = _fp8_quantize(value)
            quantized[key], quantized[key + "_scale_inv"] = q, s
        else:
            quantized[key] = value
    assert any(k.endswith("_scale_inv") and v.shape[0] > 1 and v.shape[1] > 1 for k, v in quantized.items())
    folder = tmp_path / "fp8"
    folder.mkdir()
    save_file(quantized, folder / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((tmp_path / "bf" / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    raw["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(raw))
    loaded = nanoseek.load(folder, dtype=torch.float32)
    original = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        want = original[name]
        # e4m3 keeps 3 mantissa bits: relative error at most 2^-4, plus the subnormal floor of each block
        bound = want.abs() * 2**-4 + want.abs().max() / 448 * 2**-9 + 1e-7
        assert ((param - want).abs() <= bound).all(), name
    assert nanoseek.load(folder).dtype == torch.bfloat16  # an fp8 release is served in bf16


@pytest.fixture
def saved(tmp_path):
    model = build_model(get_preset("test"), seed=0)
    nanoseek.save(model, tmp_path / "ckpt")
    return tmp_path / "ckpt", model


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    folder, _ = saved
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        nanoseek.load(folder)


def test_unexpected_tensor_is_named(saved):
    folder, _ = saved
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.extra\.weight"):
        nanoseek.load(folder)


def test_misshaped_tensor_names_key_and_both_shapes(saved):
    folder, _ = saved
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 63)))
    with pytest.raises(CheckpointError, match=r"o_proj\.weight.*\(64, 63\).*\(64, 64\)"):
        nanoseek.load(folder)


def test_truncated_file_is_refused(saved):
    folder, _ = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        nanoseek.load(folder)


def test_pickle_checkpoints_are_never_unpickled(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    get_preset("test").to_json(folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="safetensors only"):
        nanoseek.load(folder)


def test_missing_shard_is_named(tmp_path):
    model = build_model(get_preset("test"), seed=0)
    nanoseek.save(model, tmp_path / "s", max_shard_size="100KB")
    shards = sorted((tmp_path / "s").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=shards[-1].name):
        nanoseek.load(tmp_path / "s")


def test_sharded_round_trip_and_atomic_overwrite(tmp_path):
    model = build_model(get_preset("test"), seed=0)
    nanoseek.save(model, tmp_path / "s", max_shard_size="100KB")
    other = build_model(get_preset("test"), seed=1)
    nanoseek.save(other, tmp_path / "s")  # replaces the sharded folder with a single file
    assert not list((tmp_path / "s").glob("model-*"))
    loaded = nanoseek.load(tmp_path / "s")
    for (name, a), b in zip(other.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no temporary folders left behind


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = build_model(get_preset("test"), seed=0)
    nanoseek.save(model, tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("nanoseek.checkpoint.save_file", boom)
    with pytest.raises(OSError):
        nanoseek.save(build_model(get_preset("test"), seed=5), tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize("fields, match", [
    ({"num_experts_per_tok": 9}, r"num_experts_per_tok.*cannot exceed n_routed_experts \(8\)"),
    ({"n_group": 3}, r"n_group.*must divide n_routed_experts"),
    ({"topk_group": 5}, r"topk_group.*between 1 and n_group"),
    ({"hidden_size": 0}, r"hidden_size"),
    ({"topk_method": "best"}, r"topk_method"),
    ({"scoring_func": "relu"}, r"scoring_func"),
    ({"qk_rope_head_dim": 7}, r"qk_rope_head_dim.*even"),
    ({"q_lora_rank": -1}, r"q_lora_rank"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, r"original_max_position_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, r"rope_scaling.*not supported"),
    ({"topk_group": 1, "n_group": 4, "num_experts_per_tok": 3}, r"fewer than num_experts_per_tok"),
])
def test_impossible_configs_name_the_field(fields, match):
    raw = get_preset("test").to_dict() | fields
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(raw)


def test_malformed_config_json(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        nanoseek.load(folder)


def test_reads_both_config_forms():
    """The original rope_theta + rope_scaling form and transformers 5's rope_parameters."""
    yarn = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    original = get_preset("test").to_dict() | {"rope_theta": 10000, "rope_scaling": yarn}
    v5 = {k: v for k, v in original.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**{k: v for k, v in yarn.items() if k != "type"}, "rope_type": "yarn", "rope_theta": 10000.0}
    a, b = ModelConfig.from_dict(original), ModelConfig.from_dict(v5)
    assert a.yarn == b.yarn and a.rope_theta == b.rope_theta == 10000.0
    assert a.softmax_scale == b.softmax_scale


def test_written_config_is_read_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = get_preset("deepseek-v3")
    config.to_json(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3"
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40
    assert (hf.n_routed_experts, hf.num_experts_per_tok, hf.q_lora_rank) == (256, 8, 1536)
    assert hf.num_key_value_heads == 128
    assert ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text())) == config


@pytest.mark.parametrize("weight_map, match", [
    (["model-00001-of-00002.safetensors"], r"'weight_map' must map tensor names to shard files, got list"),
    ({"lm_head.weight": 3}, r"tensor lm_head\.weight is mapped to 3"),
])
def test_malformed_index_is_a_checkpoint_error(tmp_path, weight_map, match):
    folder = tmp_path / "idx"
    folder.mkdir()
    get_preset("test").to_json(folder / "config.json")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=match):
        nanoseek.load(folder)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_folder_follows_the_umask(tmp_path, umask):
    """mkdtemp makes the folder 0700; once renamed into place it must be as a plain mkdir makes it."""
    import os
    import stat

    old = os.umask(umask)
    try:
        nanoseek.save(build_model(get_preset("test"), seed=0), tmp_path / "c", max_shard_size="100KB",
                      extra_files={"tokenizer.json": "{}"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "c").iterdir())
    assert len(files) > 3
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file.name
