"""Expert load balancing as DeepSeek-V3 trains it (section 2.1.2).

- Auxiliary-loss-free: each routed expert has a bias that is added to its score only to choose
  experts. After every optimizer step, bias_i += gamma * sign(mean load - load_i): overloaded
  experts become less likely to be picked, idle ones more. No gradient flows through it.
- Sequence-wise balance loss, a small complement that keeps any single sequence from piling onto
  a few experts: L = alpha * sum_i f_i * P_i per sequence, averaged over sequences, where
  f_i = E / (K * T) * (tokens of the sequence routed to i) and P_i = mean over its tokens of the
  score of i normalised over all experts.
"""

import torch

from ..model.moe import MoE
from ..model.transformer import DeepSeekModel


def moe_layers(model: DeepSeekModel) -> list[tuple[int, MoE]]:
    """(layer index, MoE) for every MoE layer, the MTP modules' included (they route too)."""
    blocks = list(model.model.layers) + list(model.mtp)
    return [(block.layer_idx, block.mlp) for block in blocks if block.is_moe]


def token_mask(moe: MoE, real_BT: torch.Tensor | None) -> torch.Tensor | None:
    """The real (not padding) tokens of the MoE's last forward, given those of the main model's
    input (B, T), padding only at the end of a row. An MTP module at depth k routes T - k tokens
    per row, the i-th made from input token i + k: it is padding when that token is."""
    if real_BT is None:
        return None
    B, T = real_BT.shape
    return real_BT[:, T - moe.last_topk_idx.shape[0] // B :]


def routed_counts(moe: MoE, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert in the MoE's last forward (those in mask_BT only), (E,) int64."""
    topk_idx = moe.last_topk_idx if mask_BT is None else moe.last_topk_idx[mask_BT.reshape(-1)]
    return torch.bincount(topk_idx.reshape(-1), minlength=moe.gate.n_experts)


def sequence_balance_loss(moe: MoE, batch_size: int, mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """The sequence-wise balance loss of the MoE's last forward (before the alpha weight); with
    mask_BT, over each sequence's real tokens only (padding would otherwise count as load)."""
    scores_BTE = moe.last_scores.view(batch_size, -1, moe.gate.n_experts)
    topk_BN = moe.last_topk_idx.reshape(batch_size, -1)
    E, T = scores_BTE.shape[-1], scores_BTE.shape[1]
    K = topk_BN.shape[1] // T
    if mask_BT is None:
        probs_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
        counts_BE = torch.zeros(batch_size, E, device=scores_BTE.device).scatter_add_(
            1, topk_BN, torch.ones_like(topk_BN, dtype=torch.float32)
        )
        f_BE = counts_BE * (E / (K * T))
        return (f_BE * probs_BE).sum(dim=-1).mean()
    weight_BT = mask_BT.float()
    tokens_B1 = weight_BT.sum(dim=1, keepdim=True).clamp_min(1)
    probs_BE = ((scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)) * weight_BT[..., None]).sum(dim=1) / tokens_B1
    counts_BE = torch.zeros(batch_size, E, device=scores_BTE.device).scatter_add_(
        1, topk_BN, weight_BT.repeat_interleave(K, dim=1)
    )
    f_BE = counts_BE * E / (K * tokens_B1)
    rows = (mask_BT.sum(dim=1) > 0).sum().clamp_min(1)  # a row of padding only has no sequence to balance
    return (f_BE * probs_BE).sum(dim=-1).sum() / rows


@torch.no_grad()
def update_router_bias(moe: MoE, counts_E: torch.Tensor, gamma: float) -> None:
    """bias += gamma * sign(mean load - load), the auxiliary-loss-free update."""
    bias = moe.gate.e_score_correction_bias
    if bias is None or gamma == 0:
        return
    load_E = counts_E.float()
    bias += gamma * torch.sign(load_E.mean() - load_E)


def load_imbalance(counts_E: torch.Tensor) -> float:
    """max load / mean load: 1.0 is perfectly balanced, E/K means every token goes to the same K."""
    load = counts_E.float()
    return float(load.max() / load.mean().clamp_min(1e-9))
