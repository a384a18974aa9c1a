"""Multi-head Latent Attention (DeepSeek-V2 section 2.1), in a plain and an absorbed form.

Keys and values are compressed into one latent vector per token (kv_lora_rank values, normalised)
plus one rotary key shared by all heads (qk_rope_head_dim values): that is all a cache must keep.

- Plain form (training, prefill): expand the latent into per-head keys and values with kv_b_proj
  and run ordinary attention.
- Absorbed form (decode): fold kv_b_proj's key half (W_UK) into the query and its value half (W_UV)
  after attention, so attention runs directly against the cached latents, as in DeepSeek-V3's
  inference code. Both forms compute the same function.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope

# DeepSeek's q_a_layernorm and kv_a_layernorm use RMSNorm's default eps, not config.rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLA(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D, H = config.hidden_size, config.num_attention_heads
        self.n_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.qk_dim = self.nope_dim + self.rope_dim
        self.softmax_scale = config.softmax_scale
        self.interleave = config.rope_interleave
        bias = config.attention_bias
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    # ---- projections shared by both forms ------------------------------------------------------
    def query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q_nope (B, T, H, nope), q_pe (B, T, H, rope) with rope applied."""
        B, T, _ = x.shape
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleave)
        return q_nope, q_pe

    def latent_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> the cached latent (B, T, kv_rank + rope): [normed kv | roped shared key]."""
        kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return torch.cat((self.kv_a_layernorm(kv), apply_rope(k_pe, cos, sin, self.interleave)), dim=-1)

    # ---- plain form ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        """x (B, T, D); cos/sin (B or 1, T, rope/2); mask None (causal) or bool (B, T, T), True = attend."""
        B, T, _ = x.shape
        H = self.n_heads
        q_nope, q_pe = self.query(x, cos, sin)
        latent = self.latent_kv(x, cos, sin)
        kv, k_pe = latent.split([self.kv_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(kv).view(B, T, H, self.nope_dim + self.v_dim).split([self.nope_dim, self.v_dim], -1)
        # concatenated head-major, so that q and k come out contiguous (B, H, T, qk) in one copy each
        q = torch.cat((q_nope.transpose(1, 2), q_pe.transpose(1, 2)), dim=-1)  # (B, H, T, qk)
        k = torch.cat((k_nope.transpose(1, 2), k_pe.unsqueeze(1).expand(B, H, T, self.rope_dim)), dim=-1)
        v = v.transpose(1, 2)  # (B, H, T, v)
        if mask is None and _use_blocked_attention(q):
            out = blocked_causal_attention(q, k, v, self.softmax_scale)
        else:
            if self.v_dim < self.qk_dim:
                # CPU flash attention needs equal q/k and v head sizes; zero-padding v costs far less
                # than the unfused fallback (3x faster at 8x512 on the tiny config)
                v = F.pad(v, (0, self.qk_dim - self.v_dim))
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=self.softmax_scale)
            out = out[..., : self.v_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * self.v_dim))

    # ---- absorbed form -------------------------------------------------------------------------
    def absorbed_query(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> queries in latent space (B, T, H, kv_rank + rope), to dot with cached latents."""
        q_nope, q_pe = self.query(x, cos, sin)
        w_uk = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)[:, : self.nope_dim]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # W_UK folded into the query
        return torch.cat((q_latent, q_pe), dim=-1)

    def attend_latent(self, q: torch.Tensor, cache: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q (B, T, H, R) from absorbed_query; cache (B, S, R) latents; mask bool (B, T, S) or None.

        Returns the attention output after o_proj, (B, T, D). The heads are folded into the query
        rows so each step is one batched matmul against the shared latents.
        """
        B, T, H, R = q.shape
        S = cache.shape[1]
        scores = torch.bmm(q.reshape(B, T * H, R), cache.transpose(1, 2)).view(B, T, H, S)
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * self.softmax_scale  # softmax in >= fp32
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
        probs = scores.softmax(dim=-1).to(q.dtype)
        out_latent = torch.bmm(probs.view(B, T * H, S), cache[..., : self.kv_rank]).view(B, T, H, self.kv_rank)
        w_uv = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_rank)[:, self.nope_dim :]
        out = torch.einsum("bthr,hdr->bthd", out_latent, w_uv)  # W_UV applied after attention
        return self.o_proj(out.reshape(B, T, H * self.v_dim))

    def forward_absorbed(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None):
        """The absorbed form over a whole sequence (no cache): same inputs and result as forward."""
        T = x.shape[1]
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril().expand(x.shape[0], T, T)
        return self.attend_latent(self.absorbed_query(x, cos, sin), self.latent_kv(x, cos, sin), mask)


# ---- causal attention on the CPU -------------------------------------------------------------------
# Query rows per block of the blocked attention below, and the most score values one block may
# hold (heads are split further past it, so a long sequence's block stays cache- and memory-sized).
ATTENTION_BLOCK_ROWS = 64
ATTENTION_BLOCK_VALUES = 1 << 22
# With gradients, the most attention probabilities one layer may keep for its backward pass
# (B*H*T*T/2 of them): 32M, 128 MB in fp32. Past it training uses flash attention, which keeps none.
ATTENTION_SAVED_VALUES = 1 << 25


def _use_blocked_attention(q: torch.Tensor) -> bool:
    """Blocked attention beats PyTorch's CPU flash kernel at the head sizes MLA uses (tiny config,
    1 thread, 8x512: 13 vs 24 ms a layer forward; 8x256 forward + backward: 14 vs 23 ms), because
    flash needs v padded to the q/k head size and runs its small products below matmul speed. On
    GPUs the fused kernels win. With gradients, autograd keeps every block's probabilities for the
    backward pass, so a layer that would keep more than ATTENTION_SAVED_VALUES stays on flash."""
    B, H, T, _ = q.shape
    return (q.device.type == "cpu" and not torch.compiler.is_compiling()
            and (not torch.is_grad_enabled() or B * H * T * T // 2 <= ATTENTION_SAVED_VALUES))


def blocked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v, as F.scaled_dot_product_attention(is_causal=True) computes it.

    q, k (B, H, T, d), v (B, H, T, dv) -> (B, H, T, dv). Queries go in blocks of ATTENTION_BLOCK_ROWS;
    block i attends only to keys 0..end of block i, so the work above the diagonal is skipped. Each
    block's scores are one baddbmm over every head, which also applies the scale; only the block's
    diagonal tile needs the causal mask. Softmax computes in fp32 or wider whatever the input dtype:
    without autograd it takes bf16/fp16 scores as they are (PyTorch's CPU kernel computes them in
    fp32 and rounds once, the same bits as an fp32 copy, without the copies); with autograd it runs
    on an fp32 copy, so that the backward pass reads fp32 probabilities, as the fused kernels'.
    """
    B, H, T, d = q.shape
    rows = ATTENTION_BLOCK_ROWS
    q_NTd = q.reshape(B * H, T, d)
    k_NdT = k.reshape(B * H, T, d).transpose(1, 2)
    v_NTd = v.reshape(B * H, T, v.shape[-1])
    hidden = torch.ones(rows, rows, dtype=torch.bool, device=q.device).triu(1)  # key after query
    zero = q.new_zeros(())  # beta=0 ignores baddbmm's input, so a broadcast scalar stands in for it
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    score_dtype = torch.promote_types(q.dtype, torch.float32)
    heads = max(1, ATTENTION_BLOCK_VALUES // (rows * T))  # of the B*H folded heads, per block
    head_chunks = -(-B * H // heads)
    out = []
    for start in range(0, T, rows):
        end = min(start + rows, T)
        for h in range(0, B * H, heads):
            q_block = q_NTd[h : h + heads, start:end]
            scores = torch.baddbmm(zero.expand(q_block.shape[0], end - start, end), q_block,
                                   k_NdT[h : h + heads, :, :end], beta=0, alpha=scale)
            scores[..., start:end].masked_fill_(hidden[: end - start, : end - start], float("-inf"))
            probs = scores.softmax(dim=-1) if not grad else scores.to(score_dtype).softmax(dim=-1).to(v.dtype)
            out.append(torch.bmm(probs, v_NTd[h : h + heads, :end]))
    if head_chunks > 1:  # blocks were also split by heads: regroup them by query block
        out = [torch.cat(out[i : i + head_chunks]) for i in range(0, len(out), head_chunks)]
    return torch.cat(out, dim=1).view(B, H, T, -1)
