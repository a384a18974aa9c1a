"""Rotary position embedding for MLA's decoupled rope dimensions, with YaRN context extension.

YaRN (arXiv 2309.00071) interpolates low frequencies by `factor`, keeps high ones, ramps between
them (beta_fast/beta_slow), and corrects attention temperature: DeepSeek multiplies the softmax
scale by mscale(factor, mscale_all_dim)^2 (see `ModelConfig.softmax_scale`) and cos/sin by
mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for DeepSeek-V3 and V2-Lite
(without both fields, by mscale(factor); see `ModelConfig.yarn` for the fields and their defaults).
"""

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim/2,) in fp32 and the factor applied to cos and sin."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = config.yarn
    if yarn is None:
        return inv_freq, 1.0
    factor, original = yarn["factor"], yarn["original_max_position_embeddings"]

    def correction_dim(num_rotations: float) -> float:
        # the dimension whose wavelength fits num_rotations times into the original context
        return dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(yarn["beta_fast"]), correction_dim(yarn["beta_slow"])
    if yarn["truncate"]:  # DeepSeek's rounding; transformers' `truncate: false` keeps the exact ends
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if yarn["attention_factor"] is not None:  # given outright (transformers' field)
        attention_factor = yarn["attention_factor"]
    elif yarn["mscale"] and yarn["mscale_all_dim"]:
        attention_factor = yarn_mscale(factor, yarn["mscale"]) / yarn_mscale(factor, yarn["mscale_all_dim"])
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) of shape (*positions.shape, qk_rope_head_dim/2), fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_buffers(self) -> None:
        """Recompute after the module was built on the meta device."""
        self.inv_freq = rope_inv_freq(self.config)[0].to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # computed on the fly (cheap) rather than from a table, so any position and any
        # max_position_embeddings work without a 160k-row table
        freqs = positions[..., None].float() * self.inv_freq  # (..., d/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (..., T, d) by position; cos/sin (..., T, d/2) broadcast over the head dimension.

    With `interleave` (DeepSeek's layout) the rotated pairs are (x0, x1), (x2, x3), ...; otherwise
    (x_i, x_{i+d/2}). The result is laid out as [first of each pair, second of each pair] either way:
    q and k get the same layout, so their dot products are the same as in DeepSeek's code.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
