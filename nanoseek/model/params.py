"""Parameter counts from a config alone (no weights allocated), split by part of the model.

"Activated" counts what one token touches, with DeepSeek's convention: every weight except the
routed experts a token is not sent to (embedding and output head included), which gives the
37.5B of DeepSeek-V3 (the paper's "37B").
"""

import torch

from ..config import ModelConfig

PARTS = ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts", "router", "norms", "output_head")


def attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        q = D * H * qk
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    bias = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank + cfg.qk_rope_head_dim + D if cfg.attention_bias else 0
    return q + kv + H * cfg.v_head_dim * D + bias


def _layer_parts(cfg: ModelConfig, layer_idx: int) -> dict[str, int]:
    D = cfg.hidden_size
    parts = dict.fromkeys(PARTS, 0)
    parts["attention"] = attention_params(cfg)
    parts["norms"] = 2 * D
    if cfg.is_moe_layer(layer_idx):
        expert = 3 * D * cfg.moe_intermediate_size
        parts["routed_experts"] = cfg.n_routed_experts * expert
        parts["shared_experts"] = cfg.n_shared_experts * expert
        parts["router"] = cfg.n_routed_experts * D + (cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0)
    else:
        parts["dense_ffn"] = 3 * D * cfg.intermediate_size
    return parts


def _inactive_experts(cfg: ModelConfig, layer_idx: int) -> int:
    if not cfg.is_moe_layer(layer_idx):
        return 0
    return (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def count_parameters(cfg: ModelConfig) -> dict:
    """Counts for the main model (by part), its activated count, and the MTP modules."""
    D, V = cfg.hidden_size, cfg.vocab_size
    parts = dict.fromkeys(PARTS, 0)
    parts["embeddings"] = V * D
    parts["output_head"] = 0 if cfg.tie_word_embeddings else V * D
    parts["norms"] = D  # final norm
    inactive = 0
    for i in range(cfg.num_hidden_layers):
        for name, n in _layer_parts(cfg, i).items():
            parts[name] += n
        inactive += _inactive_experts(cfg, i)
    total = sum(parts.values())
    mtp_total = mtp_inactive = 0
    for k in range(cfg.num_nextn_predict_layers):
        idx = cfg.num_hidden_layers + k
        mtp_total += sum(_layer_parts(cfg, idx).values()) + 2 * D * D + 3 * D  # eh_proj, enorm/hnorm/head norm
        mtp_inactive += _inactive_experts(cfg, idx)
    return {
        "parts": parts,
        "total": total,
        "activated": total - inactive,
        "activated_routed_experts": parts["routed_experts"] - inactive,
        "mtp_total": mtp_total,
        "mtp_activated": mtp_total - mtp_inactive,
        # DeepSeek's checkpoints store a copy of the embedding and head with every MTP module
        "checkpoint_total": total + mtp_total + cfg.num_nextn_predict_layers * 2 * V * D,
    }


def vision_params(cfg: ModelConfig) -> int:
    """The vision tower's parameters (encoder, stem, projector, layout tokens); 0 for a text model.
    Built on the meta device, so nothing is allocated and the count follows the module's own code."""
    if cfg.vision_config is None:
        return 0
    from .vision import VisionConfig, VisionModel

    with torch.device("meta"):
        tower = VisionModel(VisionConfig.from_dict(cfg.vision_config), cfg.hidden_size)
    return sum(p.numel() for p in tower.parameters())


def human(n: int | float, digits: int = 1) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(int(n))


def format_counts(name: str, cfg: ModelConfig) -> str:
    c = count_parameters(cfg)
    lines = [
        f"{name}: {human(c['total'], 2)} total parameters, {human(c['activated'], 2)} activated per token "
        f"(main model; {human(c['activated'] - c['parts']['embeddings'], 2)} without the input embedding)",
    ]
    labels = {
        "embeddings": "embeddings", "attention": "attention (MLA)", "dense_ffn": "dense FFN",
        "routed_experts": "routed experts", "shared_experts": "shared experts", "router": "routers",
        "norms": "norms", "output_head": "output head",
    }
    for part, label in labels.items():
        n = c["parts"][part]
        extra = f"   ({human(c['activated_routed_experts'])} activated)" if part == "routed_experts" and n else ""
        lines.append(f"  {label:<18}{human(n):>9}{extra}")
    if cfg.num_nextn_predict_layers:
        lines.append(
            f"MTP modules ({cfg.num_nextn_predict_layers}): {human(c['mtp_total'], 2)} "
            f"({human(c['mtp_activated'], 2)} activated), embedding and head shared with the main model"
        )
        lines.append(f"checkpoint with MTP (shared embedding/head stored again): {human(c['checkpoint_total'], 2)}")
    if n_vision := vision_params(cfg):
        lines.append(f"vision tower (encoder, projector, layout tokens; read once per image): {human(n_vision, 2)}")
    return "\n".join(lines)
