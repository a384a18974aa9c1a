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


def routed_counts(moe: MoE) -> torch.Tensor:
    """Tokens routed to each expert in the MoE's last forward, (E,) int64."""
    return torch.bincount(moe.last_topk_idx.reshape(-1), minlength=moe.gate.n_experts)


def sequence_balance_loss(moe: MoE, batch_size: int) -> torch.Tensor:
    """The sequence-wise balance loss of the MoE's last forward (before the alpha weight)."""
    scores_BTE = moe.last_scores.view(batch_size, -1, moe.gate.n_experts)
    topk_BN = moe.last_topk_idx.reshape(batch_size, -1)
    E, T = scores_BTE.shape[-1], scores_BTE.shape[1]
    K = topk_BN.shape[1] // T
    probs_BE = (scores_BTE / scores_BTE.sum(dim=-1, keepdim=True)).mean(dim=1)
    counts_BE = torch.zeros(batch_size, E, device=scores_BTE.device).scatter_add_(
        1, topk_BN, torch.ones_like(topk_BN, dtype=torch.float32)
    )
    f_BE = counts_BE * (E / (K * T))
    return (f_BE * probs_BE).sum(dim=-1).mean()


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
