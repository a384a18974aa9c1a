"""Regressions from review 14 of the model, config and checkpoint code against transformers and DeepSeek.

- YaRN fields that transformers reads and nanoseek ignored or read differently: `attention_factor`,
  `truncate`, and an absent `mscale` (transformers then scales cos/sin by mscale(factor) alone);
- a transformers-5 `rope_parameters` beside a null `rope_scaling` lost its YaRN;
- an fp8 weight whose block scale sits in another shard of the index could not be loaded.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from hf_reference import YARN, make_hf_model
from nanoseek.config import ConfigError, ModelConfig

pytest.importorskip("transformers")

YARN_VARIANTS = {
    "no-mscale": {k: v for k, v in YARN.items() if k != "mscale"},
    "attention-factor": dict(YARN, attention_factor=1.3),
    "not-truncated": dict(YARN, truncate=False),
}


@pytest.mark.parametrize("case", sorted(YARN_VARIANTS))
def test_yarn_fields_match_transformers(case, tmp_path):
    hf = make_hf_model("v3", rope_scaling=YARN_VARIANTS[case], num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    model = nanoseek.load(tmp_path)
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(200, 224).unsqueeze(0)  # past original_max_position_embeddings
    with torch.no_grad():
        ref = hf(ids, position_ids=positions).logits
        assert (model(ids, positions=positions) - ref).abs().max().item() < 1e-4


def test_rope_parameters_beside_a_null_rope_scaling_keep_yarn():
    rope_parameters = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                       "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707}
    config = ModelConfig.from_dict({**get_test_dict(), "rope_scaling": None, "rope_theta": None,
                                    "rope_parameters": rope_parameters})
    assert config.yarn is not None and config.yarn["factor"] == 4.0
    assert config.rope_theta == 50000.0


@pytest.mark.parametrize("field, value", [("attention_factor", -1.0), ("truncate", "false")])
def test_bad_yarn_fields_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"rope_scaling.*'{field}'"):
        ModelConfig.from_dict({**get_test_dict(), "rope_scaling": dict(YARN, **{field: value})})


def test_fp8_scale_in_another_shard_loads(tmp_path):
    model = nanoseek.build_model(nanoseek.get_preset("test").replace(num_nextn_predict_layers=0), seed=0)
    nanoseek.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    scale = tensors[key].abs().max().reshape(1, 1) / 448
    tensors[key] = (tensors[key] / scale).to(torch.float8_e4m3fn)
    (tmp_path / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "a.safetensors"))
    save_file({key + "_scale_inv": scale}, str(tmp_path / "b.safetensors"))  # the pair split at a shard boundary
    weight_map = {k: "a.safetensors" for k in tensors} | {key + "_scale_inv": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = nanoseek.load(tmp_path).model.layers[0].mlp.down_proj.weight
    assert torch.equal(loaded, tensors[key].float() * scale)


def get_test_dict() -> dict:
    return nanoseek.get_preset("test").to_dict()
