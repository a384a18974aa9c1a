"""Small building blocks shared by the model: RMSNorm and the SwiGLU feed-forward."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused pass; on the CPU bitwise equal to the two steps below, which round to x.dtype
            # in between and so differ in bf16
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # normalised in fp32 and cast back before the weight, as DeepSeek and transformers do; for
        # bf16/fp16 input F.rms_norm computes in fp32 and rounds once, bitwise the same as an fp32
        # copy (tests/test_model.py) without the two copies
        normed = F.rms_norm(x if x.dtype in (torch.bfloat16, torch.float16) else x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
