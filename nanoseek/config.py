"""ModelConfig: every architectural switch of a DeepSeek-V2/V3 model, under Hugging Face's field names.

A config reads a DeepSeek `config.json` in both forms in use (the original `rope_theta` +
`rope_scaling`, and transformers 5's `rope_parameters`), writes one that transformers reads, and
refuses impossible values with an error naming the field. Named presets live in `PRESETS`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
BOOL_FIELDS = ("norm_topk_prob", "rope_interleave", "tie_word_embeddings", "attention_bias")


class ConfigError(ValueError):
    """A config value is missing, of the wrong type, or impossible; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 2048  # width of one routed or shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536  # None: plain q projection, as in DeepSeek-V2-Lite
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256  # 0: a dense model (every layer uses intermediate_size)
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: type, factor, original_max_position_embeddings, beta_*, mscale*
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    attention_bias: bool = False
    model_type: str = "deepseek_v3"
    # Vision tower and projector (DeepSeek-VL2 manner); None for a text-only model.
    vision_config: dict | None = None
    image_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # one spelling of the kind, under both names in use
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            self.rope_scaling = {**self.rope_scaling, "type": kind, "rope_type": kind}
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name: str, why: str):
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        ints_positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "max_position_embeddings", "moe_layer_freq",
        ]
        for name in BOOL_FIELDS:
            # a JSON "false" string (or 0) would otherwise read as a truthy (or falsy) switch unnoticed
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be true or false (a JSON boolean)")
        for name in ints_positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        ints_nonneg = [
            "qk_nope_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace",
            "num_nextn_predict_layers", "intermediate_size", "moe_intermediate_size",
        ]
        for name in ints_nonneg:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not _is_int(self.q_lora_rank) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer or null (plain q projection)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even: rotary dimensions come in pairs")
        if self.model_type not in MODEL_TYPES:
            fail("model_type", f"must be one of {MODEL_TYPES}")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU experts) is used by DeepSeek models")
        for name in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                fail(name, "must be a positive number")
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            if self.intermediate_size <= 0 and any(
                not self.is_moe_layer(i) for i in range(self.num_hidden_layers)
            ):
                fail("intermediate_size", "dense layers exist, so it must be positive")
        if self.n_routed_experts > 0:
            if self.moe_intermediate_size <= 0:
                fail("moe_intermediate_size", "must be positive when n_routed_experts > 0")
            if self.topk_method not in TOPK_METHODS:
                fail("topk_method", f"must be one of {TOPK_METHODS}")
            if self.scoring_func not in SCORING_FUNCS:
                fail("scoring_func", f"must be one of {SCORING_FUNCS}")
            if not _is_int(self.num_experts_per_tok) or self.num_experts_per_tok <= 0:
                fail("num_experts_per_tok", "must be a positive integer")
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", f"cannot exceed n_routed_experts ({self.n_routed_experts})")
            if not _is_int(self.n_group) or self.n_group <= 0:
                fail("n_group", "must be a positive integer")
            if self.n_routed_experts % self.n_group:
                fail("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
            if not _is_int(self.topk_group) or not 0 < self.topk_group <= self.n_group:
                fail("topk_group", f"must be between 1 and n_group ({self.n_group})")
            experts_per_group = self.n_routed_experts // self.n_group
            if self.topk_method != "greedy" and self.topk_group * experts_per_group < self.num_experts_per_tok:
                fail(
                    "topk_group",
                    f"the {self.topk_group} chosen groups hold {self.topk_group * experts_per_group} experts, "
                    f"fewer than num_experts_per_tok ({self.num_experts_per_tok})",
                )
            if self.topk_method == "noaux_tc" and self.n_group > 1 and experts_per_group < 2:
                fail("n_group", "noaux_tc scores a group by its top-2 experts, so each group needs at least 2")
            if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
                fail("topk_method", "noaux_tc (bias-corrected choice) is defined for scoring_func 'sigmoid'")
            if not _is_number(self.routed_scaling_factor) or self.routed_scaling_factor <= 0:
                fail("routed_scaling_factor", "must be a positive number")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                fail("rope_scaling", "must be a dict or null")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind is None:  # without a kind the scaling would be silently dropped
                fail("rope_scaling", "needs a 'type' (or 'rope_type'), e.g. 'yarn'")
            if kind not in ("yarn", "default"):
                fail("rope_scaling", f"type {kind!r} is not supported (DeepSeek uses 'yarn')")
            if kind == "yarn":
                factor = self.rope_scaling.get("factor")
                if not _is_number(factor) or factor < 1:
                    fail("rope_scaling", "yarn needs 'factor' >= 1")
                omp = self.rope_scaling.get("original_max_position_embeddings")
                if not _is_int(omp) or omp <= 0:
                    fail("rope_scaling", "yarn needs a positive integer 'original_max_position_embeddings'")
                attention_factor = self.rope_scaling.get("attention_factor")
                if attention_factor is not None and (not _is_number(attention_factor) or attention_factor <= 0):
                    fail("rope_scaling", "yarn's 'attention_factor' must be a positive number or absent")
                if not isinstance(self.rope_scaling.get("truncate", True), bool):
                    fail("rope_scaling", "yarn's 'truncate' must be true or false (a JSON boolean)")
        if self.vision_config is not None:
            from .model.vision import VisionConfig  # the vision fields are defined and checked beside the tower

            VisionConfig.from_dict(self.vision_config)
            if not _is_int(self.image_token_id) or not 0 <= self.image_token_id < self.vocab_size:
                fail("image_token_id", f"a model with a vision_config needs an id in [0, vocab_size={self.vocab_size})")
        for name in ("bos_token_id", "pad_token_id", "image_token_id"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value):
                fail(name, "must be a non-negative integer or null")
        for token in self.eos_token_ids:
            if not _is_int(token) or token < 0:
                fail("eos_token_id", "must be a non-negative integer, a list of them, or null")

    # ---- YaRN ----------------------------------------------------------------------------------
    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters with defaults filled in, or None without YaRN.

        Defaults are transformers' (the reader of the config.json nanoseek writes): an absent mscale
        or mscale_all_dim is 0, which turns the cos/sin factor into plain mscale(factor) (DeepSeek's
        remote code instead defaults mscale to 1 and always takes the ratio; every DeepSeek release
        sets both, where the two agree); `attention_factor`, when given, replaces that factor;
        `truncate` false keeps the ramp's ends unrounded.
        """
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        attention_factor = rs.get("attention_factor")
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": float(rs.get("mscale") or 0.0),
            "mscale_all_dim": float(rs.get("mscale_all_dim") or 0.0),
            "attention_factor": None if attention_factor is None else float(attention_factor),
            "truncate": rs.get("truncate", True),
        }

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek applies it."""
        scale = self.qk_head_dim ** -0.5
        yarn = self.yarn
        if yarn and yarn["mscale_all_dim"]:
            m = yarn_mscale(yarn["factor"], yarn["mscale_all_dim"])
            scale = scale * m * m
        return scale

    # ---- (de)serialisation ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Build from a DeepSeek/transformers config dict; unknown keys are ignored."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(raw).__name__}")
        d = dict(raw)
        # transformers 5 moved rope_theta and rope_scaling into one rope_parameters dict.
        rope_parameters = d.pop("rope_parameters", None)
        if isinstance(rope_parameters, dict):
            rp = dict(rope_parameters)
            # a null rope_theta or rope_scaling beside it (a config carried over from the old form)
            # says nothing, as transformers reads it
            if "rope_theta" in rp and d.get("rope_theta") is None:
                d["rope_theta"] = rp.pop("rope_theta")
            rp.pop("rope_theta", None)
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                rp.setdefault("type", kind)
                d["rope_scaling"] = rp
        if d.get("num_mtp_layers") is not None and "num_nextn_predict_layers" not in d:
            d["num_nextn_predict_layers"] = d["num_mtp_layers"]
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' = {model_type!r}: must be one of {MODEL_TYPES}")
        # DeepSeek-V2 configs omit fields whose V2 defaults differ from V3's.
        defaults = V2_DEFAULTS if model_type == "deepseek_v2" else {}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {**defaults, **{k: v for k, v in d.items() if k in names}}
        if kwargs.get("n_routed_experts") is None:
            kwargs["n_routed_experts"] = 0
        for name in ("n_group", "topk_group"):
            if kwargs.get(name) is None:
                kwargs[name] = 1
        if kwargs.get("n_shared_experts") is None:
            kwargs["n_shared_experts"] = 0
        if kwargs.get("num_experts_per_tok") is None:
            kwargs["num_experts_per_tok"] = 1 if kwargs["n_routed_experts"] else 0
        if kwargs.get("rope_interleave") is None:
            kwargs["rope_interleave"] = True
        for name in ("norm_topk_prob", "tie_word_embeddings", "attention_bias"):
            if name in kwargs and kwargs[name] is None:  # transformers reads null as false
                kwargs[name] = False
        if isinstance(kwargs.get("rope_theta"), int):
            kwargs["rope_theta"] = float(kwargs["rope_theta"])
        if kwargs.get("n_routed_experts", 0) == 0:
            kwargs.setdefault("num_experts_per_tok", 0)
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong type that validate could not name
            raise ConfigError(str(e)) from e

    def to_dict(self) -> dict[str, Any]:
        """A config.json that DeepSeek's own code, transformers 4 and transformers 5 all read.

        transformers' classes know fewer switches than nanoseek, so some fields are written in the
        form they understand, one that reads back here as the same model: the first MoE layer as
        first_k_dense_replace, top-1 routing without norm_topk_prob, and the model_type whose router
        computes ours. What no transformers class computes is listed by `transformers_mismatches`.
        """
        d = dataclasses.asdict(self)
        d["first_k_dense_replace"] = self._hf_first_k_dense_replace()
        # top-1 weights are never renormalised here (DeepSeek's rule), but transformers' V3 would
        # turn every weight into 1.0
        d["norm_topk_prob"] = self.norm_topk_prob and self.num_experts_per_tok > 1
        d["model_type"] = self._hf_model_type()
        d["architectures"] = ["DeepseekV3ForCausalLM" if d["model_type"] == "deepseek_v3" else "DeepseekV2ForCausalLM"]
        d["num_key_value_heads"] = self.num_attention_heads  # MLA: every head has its own key
        d["head_dim"] = self.qk_rope_head_dim
        if self.vision_config is None:
            d.pop("vision_config")
            d.pop("image_token_id")
        return d

    # ---- what transformers' DeepseekV3/V2 classes can express -----------------------------------
    def _moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def _hf_first_k_dense_replace(self) -> int:
        """transformers makes layer i MoE iff i >= first_k_dense_replace, whatever n_routed_experts and
        moe_layer_freq say: write the first MoE layer (num_hidden_layers when there is none). MTP
        layers sit at index >= num_hidden_layers, so any value up to it leaves them as they were."""
        moe = self._moe_layers()
        return moe[0] if moe else max(self.num_hidden_layers, self.first_k_dense_replace)

    def _hf_router_mismatch(self, model_type: str) -> tuple[str, str] | None:
        """(field, why) when transformers' class for model_type routes differently, else None."""
        if not self._moe_layers():
            return None
        if model_type == "deepseek_v3":
            if self.topk_method != "noaux_tc":  # V3 reads neither topk_method nor scoring_func
                return "topk_method", "transformers' DeepseekV3 always routes with sigmoid scores plus e_score_correction_bias over groups (noaux_tc)"
            return None
        if self.topk_method == "noaux_tc":
            return "topk_method", "transformers' DeepseekV2 knows only 'greedy' and 'group_limited_greedy'"
        if self.scoring_func != "softmax":
            return "scoring_func", "transformers' DeepseekV2 always scores experts with softmax"
        if self.norm_topk_prob and self.num_experts_per_tok > 1:
            return "norm_topk_prob", "transformers' DeepseekV2 never renormalises the top-k weights"
        if not self.rope_interleave:
            return "rope_interleave", "transformers' DeepseekV2 always rotates interleaved pairs"
        return None

    def _hf_model_type(self) -> str:
        """Our own model_type, unless only the other class computes this router (a V3-style
        config with V2's softmax greedy routing, or the reverse)."""
        other = "deepseek_v2" if self.model_type == "deepseek_v3" else "deepseek_v3"
        if self._hf_router_mismatch(self.model_type) and not self._hf_router_mismatch(other):
            return other
        return self.model_type

    def transformers_mismatches(self) -> list[str]:
        """Why a transformers model loaded from this config's config.json would compute different
        logits than nanoseek; empty when it computes the same."""
        problems = []
        written = self._hf_first_k_dense_replace()
        dense = [i for i in range(written, self.num_hidden_layers) if not self.is_moe_layer(i)]
        if dense:
            problems.append(
                f"config field 'moe_layer_freq' = {self.moe_layer_freq!r}: layers {dense} are dense here, but "
                f"transformers makes every layer from first_k_dense_replace = {written} on an MoE layer"
            )
        reasons = [self._hf_router_mismatch(model_type) for model_type in MODEL_TYPES]
        if all(reasons):  # neither class computes this router: say what stands in the way of each
            problems += [f"config field '{name}' = {getattr(self, name)!r}: {why}" for name, why in reasons]
        return problems

    def warn_transformers_mismatches(self) -> None:
        # no folder in the message: a training run saves every few hundred steps, and Python shows
        # a repeated warning once
        for problem in self.transformers_mismatches():
            warnings.warn(f"{problem}; transformers will compute different logits from the config.json written",
                          stacklevel=3)

    @classmethod
    def from_json(cls, path: str | os.PathLike, raw: Any = None) -> "ModelConfig":
        """A config.json -> ModelConfig; every error names the file. raw: the file's contents when the
        caller has read them already (with read_config_json), as checkpoint.load does for the dtype."""
        raw = read_config_json(path) if raw is None else raw
        try:
            return cls.from_dict(raw)
        except ConfigError as e:  # the field alone does not say which of the user's files holds it
            raise ConfigError(f"{path}: {e}") from e

    def to_json(self, path: str | os.PathLike) -> None:
        self.warn_transformers_mismatches()
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)


def read_config_json(path: str | os.PathLike) -> Any:
    """The parsed contents of a config.json; ConfigError naming the file if it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except OSError as e:  # missing, a folder, unreadable: the user's path, not a traceback
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from e


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not the number 1


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


V2_DEFAULTS = dict(
    first_k_dense_replace=0,
    topk_method="greedy",
    scoring_func="softmax",
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    n_group=1,
    topk_group=1,
    bos_token_id=100000,
    eos_token_id=100001,
    num_nextn_predict_layers=0,
)

_DEEPSEEK_YARN = {
    "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
}

PRESETS: dict[str, ModelConfig] = {
    # The released DeepSeek-V3 / R1 (671B total, 37B activated), with its one MTP module.
    "deepseek-v3": ModelConfig(
        max_position_embeddings=163840, rope_scaling=dict(_DEEPSEEK_YARN), num_nextn_predict_layers=1,
    ),
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): softmax gating, no q compression.
    "deepseek-v2-lite": ModelConfig(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        max_position_embeddings=163840,
        rope_scaling={**_DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        bos_token_id=100000, eos_token_id=100001,
    ),
    # The 8M-parameter config the reference measurements use (shared/notes/measurements.md).
    "tiny": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, max_position_embeddings=2048, num_nextn_predict_layers=1,
    ),
    # tiny's layout at four times the width (112M parameters, 47M activated matmul parameters per
    # token): the benchmarks' second config, wide enough that matmuls, not per-call overhead and
    # element-wise work, set a step's time, as at real model widths (bf16 most of all).
    "medium": ModelConfig(
        vocab_size=8192, hidden_size=1024, intermediate_size=2560, moe_intermediate_size=512, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # A few-hundred-kilobyte model for unit tests.
    "test": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        n_group=4, topk_group=2, max_position_embeddings=512, num_nextn_predict_layers=1,
    ),
    # The README's main job: a 10M-parameter (6.6M activated) DeepSeek-V3-architecture model with one
    # MTP module, sized to learn Python's standard library in ~10 minutes on 2 CPU cores. The dense
    # layer is as wide as the experts a token activates (4 routed + 1 shared), as in DeepSeek-V3 (9 x 2048).
    "small": ModelConfig(
        vocab_size=8192, hidden_size=256, intermediate_size=640, moe_intermediate_size=128, num_hidden_layers=4,
        first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=32, v_head_dim=32, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
        n_group=4, topk_group=2, max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])
