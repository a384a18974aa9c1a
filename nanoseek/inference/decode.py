"""The two kinds of engine step, as plain functions of tensors so torch.compile can take them whole.

- `prefill`: fresh sequences (padded on the right) through the plain form of MLA, filling the
  cache, then the first token of each (and, when speculating, the first drafts).
- `decode_step`: one new token per row through the absorbed form, sampling included, so a step
  is one compiled graph whose only output the host reads is the (B,) sampled ids.

`compiled(fn)` wraps a step in torch.compile once per process, with dynamic shapes so that batch
size and attended length can change between steps without recompiling.
"""

import warnings

import torch

from ..model.transformer import DeepSeekModel
from .forward import model_forward
from .sampling import TARGET, SamplingBatch, sample
from .speculative import _rows, draft, mark_seen


def decode_step(model: DeepSeekModel, kv, seen_BV, ids_B, pos_B, s: SamplingBatch):
    """Tokens ids_B at positions pos_B -> the next token of each row (B,); seen_BV is updated."""
    hidden = model_forward(model, kv, ids_B.unsqueeze(1), pos_B.unsqueeze(1))
    seen = seen_BV.unsqueeze(1) if s.any_penalty else None
    next_B = sample(model.lm_head(hidden), s, seen, pos_B.unsqueeze(1) + 1, TARGET).squeeze(1)
    seen_BV[torch.arange(ids_B.shape[0], device=ids_B.device), next_B] = True
    return next_B


@torch.inference_mode()
def prefill(model: DeepSeekModel, kv, seen_BV, prompts: list[list[int]], s: SamplingBatch, draft_tokens: int = 0):
    """Run fresh prompts (lengths may differ) into cache rows kv[:, :B] and sample each one's first token.

    seen_BV rows are reset to the prompt's tokens plus the sampled one. Returns the first tokens (B,)
    and, with draft_tokens > 0, the MTP drafts (B, k) and their distributions (B, k, V).
    """
    B, T = len(prompts), max(len(p) for p in prompts)
    device = kv.device
    ids_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        ids_BT[b, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    lengths_B = torch.tensor([len(p) for p in prompts], device=device)
    pos_BT = torch.arange(T, device=device).expand(B, T)
    hidden_BTD = model_forward(model, kv, ids_BT, pos_BT, plain=True)
    last_B = lengths_B - 1
    seen_BV.zero_()
    valid_BT = pos_BT < lengths_B.unsqueeze(1)
    seen_BV.copy_(mark_seen(seen_BV, ids_BT, valid_BT))
    logits_B1V = model.lm_head(_rows(hidden_BTD, last_B)).unsqueeze(1)
    seen = seen_BV.unsqueeze(1) if s.any_penalty else None
    first_B = sample(logits_B1V, s, seen, lengths_B.unsqueeze(1), TARGET).squeeze(1)
    seen_BV[torch.arange(B, device=device), first_B] = True
    if not draft_tokens:
        return first_B, None, None
    # MTP row i reads token i+1: the prompt shifted by one, with the first sampled token at the end
    next_BT = torch.cat((ids_BT[:, 1:], ids_BT[:, :1]), dim=1).scatter(1, last_B.unsqueeze(1), first_B.unsqueeze(1))
    drafts, q = draft(model, kv, hidden_BTD, next_BT, torch.zeros_like(last_B), last_B, s, seen_BV, draft_tokens)
    return first_B, drafts, q


_COMPILED: dict = {}


def compiled(fn, enable: bool = True):
    """fn compiled with torch.compile (cached per function), or fn itself when disabled."""
    if not enable:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED[fn]


def run_step(fn, *args, compile: bool = True):
    """Call the (compiled) step; if compiling fails, warn once and fall back to eager for good."""
    if compile and _COMPILED.get(fn) is not False:
        try:
            return compiled(fn)(*args)
        except Exception as e:  # inductor needs a working C++ compiler; eager is always available
            warnings.warn(f"torch.compile of {fn.__name__} failed ({type(e).__name__}: {e}); decoding eagerly")
            _COMPILED[fn] = False
    return fn(*args)
