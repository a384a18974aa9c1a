"""Forward passes that read and write the latent cache: prefill, decode, verify, and the MTP draft.

Every function here takes a `CacheView`: the whole cache buffer (layers, slots, max_len, R), the
slot of batch row 0, and how many positions a step attends to. A token at position p of row b
writes its latent at kv[layer, first + b, p] and then attends to positions <= p (the mask), so
padding and stale entries past a sequence's end are never read. Writes go into the whole buffer
with one index_put, never through a slice of it: under torch.compile a write through a slice of
an input is functionalised into a copy of the entire input.

- Decode and verify (T new tokens on top of a cache) use MLA's absorbed form: attention runs
  against the cached latents directly, nothing is expanded per head.
- Prefill of fresh sequences may use the plain form (`plain=True`): causal attention over the
  prompt in query blocks on the CPU (PyTorch's fused kernel elsewhere), which never holds all the
  (T, T) scores per head that the absorbed form would need, and the cache is filled on the side.
"""

from typing import NamedTuple

import torch

from ..model.block import Block
from ..model.moe import MoE
from ..model.transformer import DeepSeekModel


class CacheView(NamedTuple):
    kv: torch.Tensor  # the whole cache, (layers, slots, max_len, R)
    first: int  # slot of batch row 0; row b is slot first + b
    attend: int  # positions attended to, 0..attend-1

    def write(self, layer: int, pos_BT: torch.Tensor, latent_BTR: torch.Tensor) -> None:
        B = pos_BT.shape[0]
        rows_BT = (self.first + torch.arange(B, device=pos_BT.device)).unsqueeze(1).expand_as(pos_BT)
        self.kv.index_put_((torch.full_like(pos_BT, layer), rows_BT, pos_BT), latent_BTR.to(self.kv.dtype))

    def read(self, layer: int, B: int) -> torch.Tensor:
        """(B, attend, R)"""
        return self.kv[layer, self.first : self.first + B, : self.attend]


def position_mask(pos_BT: torch.Tensor, S: int) -> torch.Tensor:
    """(B, T, S) bool: True where key position <= query position."""
    return torch.arange(S, device=pos_BT.device) <= pos_BT.unsqueeze(-1)


def moe_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE.forward for inference: same result, without storing the routing for balancing.

    Compiled, every step gathers each token's experts: the sorted path's grouped matmul has no
    fp32 kernel under torch.compile and would fall back to a Python loop over experts with a host
    sync. Inductor turns the gathered matmuls into kernels that read the chosen experts' weights in
    place, without copying them out first (benchmarks/decode.py: faster than every expert on every
    token at batch 8, the alternative without a loop).
    """
    shape = x.shape
    x_TD = x.reshape(-1, shape[-1])
    topk_idx_TK, topk_weight_TK, _ = moe.gate(x_TD)
    gathered = True if torch.compiler.is_compiling() else None
    y_TD = moe.experts(x_TD, topk_idx_TK, topk_weight_TK, gathered=gathered).to(x.dtype)
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD)
    return y_TD.view(shape)


def block_forward(block: Block, layer: int, x, cos, sin, cache: CacheView, pos_BT, mask, plain: bool) -> torch.Tensor:
    """One decoder block over new tokens x (B, T, D) at positions pos_BT, using cache layer `layer`."""
    attn = block.self_attn
    h = block.input_layernorm(x)
    cache.write(layer, pos_BT, attn.latent_kv(h, cos, sin))
    if plain:  # fresh sequences starting at position 0: causal attention over the new tokens only
        x = x + attn(h, cos, sin)
    else:
        q_BTHR = attn.absorbed_query(h, cos, sin)
        # the cache may hold another dtype than the model (Engine's cache_dtype): attend in the model's
        x = x + attn.attend_latent(q_BTHR, cache.read(layer, x.shape[0]).to(q_BTHR.dtype), mask)
    h = block.post_attention_layernorm(x)
    return x + (moe_forward(block.mlp, h) if block.is_moe else block.mlp(h))


def model_forward(model: DeepSeekModel, cache: CacheView, ids_BT: torch.Tensor, pos_BT: torch.Tensor,
                  plain: bool = False, embeds_BTD: torch.Tensor | None = None) -> torch.Tensor:
    """The main model over new tokens (B, T) at positions (B, T) -> final-normed hidden (B, T, D).

    Logits are `model.lm_head(hidden)`, left to the caller so that prefill pays for the head only
    at each sequence's last position. embeds_BTD replaces the token embeddings (a prompt with
    images, from `model.embed_multimodal`).
    """
    x = model.embed(ids_BT) if embeds_BTD is None else embeds_BTD
    cos, sin = model.rotary(pos_BT)
    mask = None if plain else position_mask(pos_BT, cache.attend)
    for i, block in enumerate(model.model.layers):
        x = block_forward(block, i, x, cos, sin, cache, pos_BT, mask, plain)
    return model.model.norm(x)


def mtp_forward(model: DeepSeekModel, k: int, cache: CacheView, h_prev_BTD: torch.Tensor, next_ids_BT: torch.Tensor,
                pos_BT: torch.Tensor) -> torch.Tensor:
    """MTP module k (0-based) over rows at positions pos_BT, absorbed form.

    h_prev (B, T, D) is the previous depth's representation at those positions (the main model's
    final-normed hidden for k = 0) and next_ids the tokens one step ahead of it. Returns the new
    representation (B, T, D), before the shared head's norm (see `mtp_logits`).
    """
    layer = model.mtp[k]
    cos, sin = model.rotary(pos_BT)
    x = layer.combine(h_prev_BTD, model.embed(next_ids_BT))
    return block_forward(layer, model.config.num_hidden_layers + k, x, cos, sin, cache, pos_BT,
                         position_mask(pos_BT, cache.attend), plain=False)


def mtp_logits(model: DeepSeekModel, k: int, h: torch.Tensor) -> torch.Tensor:
    """Draft logits of MTP module k's representation, through the shared output head."""
    return model.lm_head(model.mtp[k].shared_head.norm(h))
