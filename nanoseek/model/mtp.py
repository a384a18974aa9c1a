"""Multi-Token Prediction modules (DeepSeek-V3 section 2.2).

MTP module k combines the representation of position i at depth k-1 with the embedding of token
i+k, runs one transformer block and predicts token i+k+1 through the shared output head. Module k
is stored in checkpoints as layer num_hidden_layers + k - 1: `enorm`, `hnorm`, `eh_proj`, the
block's own weights, `shared_head.norm`, plus copies of the shared `embed_tokens` and
`shared_head.head` (in nanoseek these two are the main model's, shared as in the paper).

Depth 0 is the main model's output after its final norm, as vLLM and SGLang feed DeepSeek's
released MTP weights.
"""

import torch
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .block import Block


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MTPLayer(Block):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        D = config.hidden_size
        self.enorm = RMSNorm(D, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(D, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, h_prev: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """h_prev (B, T, D) at depth k-1 and embeddings of the tokens k ahead (B, T, D) -> (B, T, D)."""
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(h_prev)), dim=-1))

    def forward(self, h_prev, next_embeds, cos, sin, mask=None) -> torch.Tensor:
        """The depth-k representation (B, T, D), before shared_head.norm."""
        return super().forward(self.combine(h_prev, next_embeds), cos, sin, mask)
