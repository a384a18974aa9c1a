"""Forward passes that read and write the latent cache: prefill, decode, verify, and the MTP draft.

Every function here takes `kv`, the active part of the cache, (layers, B, S, R): row b of the batch
is slot b of that view and S is how many positions the step may attend to. A token at position p
writes its latent at kv[:, b, p] and then attends to positions <= p (the mask), so padding and
stale entries past a sequence's end are never read.

- Decode and verify (T new tokens on top of a cache) use MLA's absorbed form: attention runs
  against the cached latents directly, nothing is expanded per head.
- Prefill of fresh sequences may use the plain form (`plain=True`): PyTorch's fused attention over
  the prompt, which never materialises the (T, T) scores that the absorbed form would need per head,
  and the cache is filled on the side.

Routed experts: for a handful of tokens each token's experts are gathered (`Experts` does this on
its own); when tokens x top_k exceed the number of experts, every expert is applied to every token
and weighted by the routing (zero for experts not chosen). That reads each expert's weights once,
like the grouped matmul, and unlike it traces into a single graph under torch.compile, with no
Python loop over experts and no host sync.
"""

import torch
import torch.nn.functional as F

from ..model.block import Block
from ..model.moe import Experts, MoE
from ..model.transformer import DeepSeekModel


def position_mask(pos_BT: torch.Tensor, S: int) -> torch.Tensor:
    """(B, T, S) bool: True where key position <= query position."""
    return torch.arange(S, device=pos_BT.device) <= pos_BT.unsqueeze(-1)


def all_experts(experts: Experts, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor):
    """Every expert on every token, weighted by the (sparse) routing weights; (T, D)."""
    T = x_TD.shape[0]
    weight_TE = torch.zeros(T, experts.n_experts, dtype=x_TD.dtype, device=x_TD.device)
    weight_TE = weight_TE.scatter(1, topk_idx_TK, topk_weight_TK.to(x_TD.dtype))
    gate, up = torch.einsum("td,edf->tef", x_TD, experts.gate_up_proj).chunk(2, dim=-1)
    return torch.einsum("tei,eid,te->td", F.silu(gate) * up, experts.down_proj, weight_TE)


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward for inference: same result, without storing the routing for balancing."""
    shape = x.shape
    x_TD = x.reshape(-1, shape[-1])
    topk_idx_TK, topk_weight_TK, _ = moe.gate(x_TD)
    T, K = topk_idx_TK.shape
    if T * K > moe.experts.n_experts and torch.compiler.is_compiling():
        y_TD = all_experts(moe.experts, x_TD.to(moe.experts.gate_up_proj.dtype), topk_idx_TK, topk_weight_TK)
    else:
        y_TD = moe.experts(x_TD, topk_idx_TK, topk_weight_TK)
    y_TD = y_TD.to(x.dtype)
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD)
    return y_TD.view(shape)


def block_forward(block: Block, x, cos, sin, kv_l, pos_BT, mask, plain: bool) -> torch.Tensor:
    """One decoder block over new tokens x (B, T, D) at positions pos_BT, with cache layer kv_l (B, S, R)."""
    attn = block.self_attn
    h = block.input_layernorm(x)
    rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    kv_l[rows, pos_BT] = attn.latent_kv(h, cos, sin).to(kv_l.dtype)
    if plain:  # fresh sequences starting at position 0: causal attention over the new tokens only
        x = x + attn(h, cos, sin)
    else:
        x = x + attn.attend_latent(attn.absorbed_query(h, cos, sin), kv_l, mask)
    h = block.post_attention_layernorm(x)
    return x + (moe_forward(block.mlp, h) if block.is_moe else block.mlp(h))


def model_forward(model: DeepSeekModel, kv: torch.Tensor, ids_BT: torch.Tensor, pos_BT: torch.Tensor,
                  plain: bool = False) -> torch.Tensor:
    """The main model over new tokens (B, T) at positions (B, T) -> final-normed hidden (B, T, D).

    Logits are `model.lm_head(hidden)`, left to the caller so that prefill pays for the head only
    at each sequence's last position.
    """
    x = model.embed(ids_BT)
    cos, sin = model.rotary(pos_BT)
    mask = None if plain else position_mask(pos_BT, kv.shape[2])
    for i, block in enumerate(model.model.layers):
        x = block_forward(block, x, cos, sin, kv[i], pos_BT, mask, plain)
    return model.model.norm(x)


def mtp_forward(model: DeepSeekModel, k: int, kv: torch.Tensor, h_prev_BTD: torch.Tensor, next_ids_BT: torch.Tensor,
                pos_BT: torch.Tensor, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MTP module k (0-based) over rows at positions pos_BT.

    h_prev (B, T, D) is the previous depth's representation at those positions (the main model's
    final-normed hidden for k = 0) and next_ids the tokens one step ahead of it. Returns the new
    representation (B, T, D), before the shared head's norm, and the draft logits (B, T, V).
    """
    layer = model.mtp[k]
    cos, sin = model.rotary(pos_BT)
    mask = None if plain else position_mask(pos_BT, kv.shape[2])
    x = layer.combine(h_prev_BTD, model.embed(next_ids_BT))
    h = block_forward(layer, x, cos, sin, kv[model.config.num_hidden_layers + k], pos_BT, mask, plain)
    return h, model.lm_head(layer.shared_head.norm(h))
