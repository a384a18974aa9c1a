"""DeepSeekMoE: shared experts plus fine-grained routed experts chosen per token.

Routing (`Router`) follows DeepSeek-V3 and its inference code:
- scores: sigmoid (V3) or softmax (V2) of the router logits, in fp32;
- `e_score_correction_bias` (auxiliary-loss-free balancing) is added only to choose experts; the
  gate weights come from the unbiased scores;
- group-limited top-k: experts fall in n_group groups; a group is scored by the sum of its top-2
  biased scores (noaux_tc) or by its best score (V2's group_limited_greedy); only the topk_group
  best groups stay eligible. Excluded experts are masked with -inf, as DeepSeek's code does since
  early 2025. transformers' V2 class (and DeepSeek's original V3 remote code) mask with 0.0: that
  picks the same experts unless fewer than top_k eligible experts score above 0, which softmax and
  unbiased sigmoid scores never do but a strongly negative correction bias can;
- the top-k weights are normalised to sum to 1 (norm_topk_prob, top_k > 1), then multiplied by
  routed_scaling_factor.

Routed experts are stored stacked, (E, D, 2I) and (E, I, D), and computed batched: tokens sorted by
expert go through one grouped matmul per projection (`torch._grouped_mm`), or, for a handful of
tokens (decode), each token's experts are gathered and applied with one batched matmul.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_experts, self.top_k = config.n_routed_experts, config.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        # Updated by the balancing rule, not by gradients; saved with the weights. V2 has none.
        bias = torch.zeros(config.n_routed_experts, dtype=torch.float32) if config.topk_method == "noaux_tc" else None
        self.register_buffer("e_score_correction_bias", bias)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, D) -> topk_idx_TK (long), topk_weight_TK (fp32), scores_TE (fp32, unbiased)."""
        cfg = self.config
        with torch.autocast(x_TD.device.type, enabled=False):  # router math stays fp32 under autocast
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid() if cfg.scoring_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE
        if cfg.topk_method == "noaux_tc":
            choice_TE = scores_TE + self.e_score_correction_bias.float()
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            T = x_TD.shape[0]
            grouped_TGe = choice_TE.view(T, cfg.n_group, -1)
            if cfg.topk_method == "noaux_tc":
                group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_score_TG = grouped_TGe.amax(dim=-1)
            top_groups_TG = group_score_TG.topk(cfg.topk_group, dim=-1, sorted=False).indices
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, top_groups_TG, True)
            choice_TE = grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)
        topk_idx_TK = choice_TE.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
        if self.top_k > 1 and cfg.norm_topk_prob:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx_TK, topk_weight_TK * cfg.routed_scaling_factor, scores_TE


class _GroupedMM(torch.autograd.Function):
    """torch._grouped_mm with a backward that also accepts non-contiguous output gradients."""

    @staticmethod
    def forward(ctx, x_ND, w_EDF, offsets_E):
        ctx.save_for_backward(x_ND, w_EDF, offsets_E)
        return torch._grouped_mm(x_ND, w_EDF, offs=offsets_E)

    @staticmethod
    def backward(ctx, grad_NF):
        x_ND, w_EDF, offsets_E = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_NF, w_EDF.transpose(-2, -1), offs=offsets_E)
        if ctx.needs_input_grad[1]:
            grad_w = torch._grouped_mm(x_ND.t(), grad_NF, offs=offsets_E)
        return grad_x, grad_w, None


def _grouped_mm_supported(*tensors: torch.Tensor) -> bool:
    # the CPU kernel wants fp32/bf16/fp16 rows whose strides are multiples of 16 bytes
    return all(
        t.dtype in (torch.float32, torch.bfloat16, torch.float16) and (t.shape[-1] * t.element_size()) % 16 == 0
        for t in tensors
    ) and not torch.compiler.is_compiling()


class Experts(nn.Module):
    """n_routed_experts SwiGLU experts, weights stacked for batched computation."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.inter = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, D, 2 * I))  # [gate | up], x @ W layout
        self.down_proj = nn.Parameter(torch.empty(E, I, D))

    def forward(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor,
                gathered: bool | None = None) -> torch.Tensor:
        """gathered: None picks the path by size; True forces the gathered one (compiled decode: no host sync)."""
        T, K = topk_idx_TK.shape
        w_gate_up, w_down = self.gate_up_proj, self.down_proj
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
            x_TD, w_gate_up, w_down = x_TD.to(dtype), w_gate_up.to(dtype), w_down.to(dtype)
        else:
            x_TD = x_TD.to(w_gate_up.dtype)
        if not (T * K <= self.n_experts if gathered is None else gathered):
            return self._sorted(x_TD, topk_idx_TK, topk_weight_TK, w_gate_up, w_down)
        y_TKD = self._gathered(x_TD, topk_idx_TK, w_gate_up, w_down)
        return (y_TKD * topk_weight_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(dim=1)

    def _gathered(self, x_TD, topk_idx_TK, w_gate_up, w_down) -> torch.Tensor:
        """Few tokens: read just the chosen experts' weights and apply them in one bmm each."""
        T, K = topk_idx_TK.shape
        idx_N = topk_idx_TK.reshape(-1)
        x_N1D = x_TD.repeat_interleave(K, dim=0).unsqueeze(1)
        gate, up = torch.bmm(x_N1D, w_gate_up[idx_N]).chunk(2, dim=-1)
        y_N1D = torch.bmm(F.silu(gate) * up, w_down[idx_N])
        return y_N1D.view(T, K, -1)

    def _sorted(self, x_TD, topk_idx_TK, topk_weight_TK, w_gate_up, w_down) -> torch.Tensor:
        """Many tokens: sort (token, expert) pairs by expert, one grouped matmul per projection,
        then add each weighted output back onto its token. -> (T, D)

        The gate weight scales the expert's hidden activation rather than its output: the same
        product, since the down projection is linear, on I values a row instead of D."""
        T, K = topk_idx_TK.shape
        idx_N = topk_idx_TK.reshape(-1)
        order_N = idx_N.argsort(stable=True)
        token_N = order_N // K
        # index_select/index_add_ (gather and scatter-add, each the other's backward) rather than
        # advanced indexing and index_copy_: 3-7x faster forward + backward on CPU
        x_sorted_ND = x_TD.index_select(0, token_N)
        weight_N1 = topk_weight_TK.reshape(-1)[order_N].unsqueeze(-1).to(x_TD.dtype)
        counts_E = torch.bincount(idx_N, minlength=self.n_experts)
        if _padded_is_faster(x_TD, T * K, self.n_experts):
            y_sorted_ND = self._padded(x_sorted_ND, weight_N1, idx_N[order_N], counts_E, w_gate_up, w_down)
        elif _grouped_mm_supported(x_sorted_ND, w_gate_up, w_down):
            offsets_E = counts_E.cumsum(0).to(torch.int32)
            gate, up = _GroupedMM.apply(x_sorted_ND, w_gate_up, offsets_E).chunk(2, dim=-1)
            y_sorted_ND = _GroupedMM.apply(_weighted_swiglu(gate, up, weight_N1), w_down, offsets_E)
        else:
            # one host sync for the whole layer, then a slice per expert that received tokens
            pieces, start = [], 0
            for e, count in enumerate(counts_E.tolist()):
                if count:
                    rows = slice(start, start + count)
                    gate, up = (x_sorted_ND[rows] @ w_gate_up[e]).chunk(2, dim=-1)
                    pieces.append(_weighted_swiglu(gate, up, weight_N1[rows]) @ w_down[e])
                    start += count
            y_sorted_ND = torch.cat(pieces)
        return torch.zeros_like(x_TD).index_add_(0, token_N, y_sorted_ND)

    def _padded(self, x_sorted_ND, weight_N1, expert_N, counts_E, w_gate_up, w_down) -> torch.Tensor:
        """Rows sorted by expert -> weighted outputs in the same order, through one bmm per
        projection over an (E, most rows of any expert, D) block padded with zeros. -> (N, D)"""
        N = x_sorted_ND.shape[0]
        slot_N = torch.arange(N, device=x_sorted_ND.device) - (counts_E.cumsum(0) - counts_E)[expert_N]
        x_ECD = x_sorted_ND.new_zeros(self.n_experts, int(counts_E.max()), x_sorted_ND.shape[-1])
        x_ECD[expert_N, slot_N] = x_sorted_ND
        weight_EC1 = weight_N1.new_zeros(x_ECD.shape[:2] + (1,))
        weight_EC1[expert_N, slot_N] = weight_N1
        gate, up = torch.bmm(x_ECD, w_gate_up).chunk(2, dim=-1)
        return torch.bmm(_weighted_swiglu(gate, up, weight_EC1), w_down)[expert_N, slot_N]


def _weighted_swiglu(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up * weight. Without autograd it is computed in gate's own memory (a view of the
    gate/up projection's output), with no (N, I) temporaries: a `tiny` MoE layer on 4096 tokens,
    fp32, 1 thread, took 49-51 ms instead of 51.5."""
    if torch.is_grad_enabled():
        return F.silu(gate) * up * weight
    return F.silu(gate, inplace=True).mul_(up).mul_(weight)


def _padded_is_faster(x_TD: torch.Tensor, rows: int, n_experts: int) -> bool:
    """The padded bmm beats the grouped matmul for bf16/fp16 on CPU with a few rows per expert (a
    prompt's prefill): there the CPU grouped matmul runs one small product per expert, each
    mostly overhead. tiny, bf16, 1 thread, 4 of 16 experts: 32 tokens 267 vs 593 us, 128 tokens
    544 vs 777 us, 512 tokens 1,959 vs 1,596 us; in fp32 the grouped matmul always won. Inference
    only, so training keeps one path."""
    return (x_TD.device.type == "cpu" and x_TD.dtype in (torch.bfloat16, torch.float16) and rows <= 32 * n_experts
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        # Routing of the last forward, read by training for load balancing; None until a forward ran.
        self.last_topk_idx: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        topk_idx_TK, topk_weight_TK, scores_TE = self.gate(x_TD)
        self.last_topk_idx, self.last_scores = topk_idx_TK, scores_TE
        y_TD = self.experts(x_TD, topk_idx_TK, topk_weight_TK).to(x.dtype)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)
