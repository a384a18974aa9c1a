"""MTP speculative decoding: the MTP module drafts, the main model verifies (DeepSeek-V3 section 5.4.3).

One round, for every row of the batch at once, in one compilable function:
1. verify: the main model reads [t, d_1..d_k] (the pending token and k drafts) at positions
   n..n+k in one forward and gives the target distribution p_j for each following position;
2. accept: draft d_j survives with probability min(1, p_j(d_j) / q_j(d_j)), the first rejected
   position is resampled from norm(max(0, p_j - q_j)), and if all k survive a bonus token is drawn
   from p_{k+1} (Leviathan et al. 2023, Chen et al. 2023): the output has exactly the target
   distribution. For greedy rows p and q are one-hot, so a draft survives iff it is the argmax;
3. draft: MTP module 1 reads (main hidden at position i, token i+1) for the newly verified
   positions, which both fills its own cache and gives q_1 for the position after the new pending
   token; further drafts apply the module again to its own output, one position further each time
   (the module is reused recursively, EAGLE-style, as vLLM does when k exceeds the trained depth).

Positions past a row's accepted tokens were written with rejected drafts; like any stale cache entry
they sit beyond the row's length, are never attended to, and are overwritten by the next round.
Deeper MTP modules (num_nextn_predict_layers > 1) are trained but not used to draft: their caches
would lag one position per depth behind the verified tokens; DeepSeek-V3 ships one module.
"""

import torch

from ..model.transformer import DeepSeekModel
from .forward import CacheView, model_forward, mtp_forward, mtp_logits
from .sampling import (ACCEPT, DRAFT, TARGET, SamplingBatch, probabilities, process_logits, sample_from,
                       uniform_noise)


def _rows(x: torch.Tensor, index_B: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) -> x[b, index_B[b]] (B, ...)."""
    index = index_B.view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:])
    return x.gather(1, index).squeeze(1)


def mark_seen(seen_BV: torch.Tensor, tokens_BT: torch.Tensor, valid_BT: torch.Tensor) -> torch.Tensor:
    """seen with tokens_BT added where valid_BT (duplicates allowed)."""
    added = torch.zeros(seen_BV.shape, dtype=torch.float32, device=seen_BV.device)
    return seen_BV | (added.scatter_add(1, tokens_BT, valid_BT.float()) > 0)


def draft(model: DeepSeekModel, cache: CacheView, hidden_BTD, next_ids_BT, first_pos_B, last_B, s: SamplingBatch,
          seen_BV, k: int):
    """Fill MTP module 1's cache for T rows and draft k tokens after the last committed one.

    Row r is position first_pos + r, with the main model's hidden there and next_ids_BT[:, r], the
    token one position later. last_B is each row's last committed position (as a row index); rows
    after it are padding. Returns drafts (B, k) and their distributions q (B, k, V), or None for q
    when every row is greedy (then a draft is the argmax and nothing else is needed).
    """
    T = hidden_BTD.shape[1]
    pos_BT = first_pos_B.unsqueeze(1) + torch.arange(T, device=hidden_BTD.device)
    h_B1D = _rows(mtp_forward(model, 0, cache, hidden_BTD, next_ids_BT, pos_BT), last_B).unsqueeze(1)
    pos_B1 = (first_pos_B + last_B).unsqueeze(1)  # position of the module's current row
    drafts, qs = [], []
    seen = seen_BV.unsqueeze(1) if s.any_penalty else None
    for j in range(k):
        if j:  # the module again, on its own output and the token it just drafted, one position on
            pos_B1 = pos_B1 + 1
            h_B1D = mtp_forward(model, 0, cache, h_B1D, drafts[-1], pos_B1)
        logits_B1V = mtp_logits(model, 0, h_B1D)
        if s.all_greedy:
            drafts.append(process_logits(logits_B1V, s, seen).argmax(dim=-1))
        else:
            qs.append(probabilities(logits_B1V, s, seen))
            drafts.append(sample_from(qs[-1], s, pos_B1 + 2, DRAFT))
    return torch.cat(drafts, dim=1), (torch.cat(qs, dim=1) if qs else None)


def accept(p_BTV, q_BkV, drafts_Bk, s: SamplingBatch, pos_BT):
    """Speculative rejection sampling. p (B, k+1, V) targets for positions pos_BT (B, k+1), q the drafts'.

    Returns n_accepted (B,) and tokens (B, k+1): the accepted drafts, then the resampled or bonus
    token at index n_accepted; later entries are meaningless.
    """
    B, T, V = p_BTV.shape
    k = T - 1
    # greedy rows drafted the argmax: their q is one-hot (whatever the buffer holds from other rounds)
    one_hot = torch.zeros_like(q_BkV).scatter_(-1, drafts_Bk.unsqueeze(-1), 1.0)
    q_BkV = torch.where(s.temperature.view(-1, 1, 1) > 0, q_BkV, one_hot)
    p_draft = p_BTV[:, :k].gather(-1, drafts_Bk.unsqueeze(-1)).squeeze(-1)
    q_draft = q_BkV.gather(-1, drafts_Bk.unsqueeze(-1)).squeeze(-1)
    u = uniform_noise(s.seed, pos_BT[:, :k], ACCEPT, 1).squeeze(-1)
    ok = u * q_draft < p_draft  # u < p/q without dividing by a zero q
    n_accepted = ok.long().cumprod(dim=1).sum(dim=1)
    residual = torch.cat(((p_BTV[:, :k] - q_BkV).clamp_min(0), p_BTV[:, k:]), dim=1)
    # a residual is all zero only where p == q, and then its draft is never rejected
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_BTV)
    fallback = sample_from(residual, s, pos_BT, TARGET)  # (B, k+1); only index n_accepted is used
    tokens = torch.cat((drafts_Bk, drafts_Bk[:, :1]), dim=1)
    tokens = tokens.scatter(1, n_accepted.unsqueeze(1), _rows(fallback.unsqueeze(-1), n_accepted))
    return n_accepted, tokens


def speculative_step(model: DeepSeekModel, kv, seen, drafts, q, pending_B, n_B, s: SamplingBatch, attend: int):
    """One verify-accept-draft round for the first B slots (B = len(pending_B)).

    kv, seen, drafts (slots, k) and q (slots, k, V) are the engine's whole buffers, used from slot 0
    (see `decode.decode_step`); seen, drafts and q are updated in place for the next round (q only
    when some row samples). pending_B is each row's sampled but unprocessed token, at position n_B.
    Returns n_accepted (B,) and tokens (B, k+1), the accepted drafts then the resampled or bonus token.
    """
    B, k = pending_B.shape[0], drafts.shape[1]
    cache = CacheView(kv, 0, attend)
    drafts_Bk, seen_BV = drafts[:B], seen[:B]
    ids_BT = torch.cat((pending_B.unsqueeze(1), drafts_Bk), dim=1)
    pos_BT = n_B.unsqueeze(1) + torch.arange(k + 1, device=n_B.device)
    hidden = model_forward(model, cache, ids_BT, pos_BT)
    penalty_seen = None
    if s.any_penalty:  # the target at position j has also seen drafts 1..j-1
        prefix = torch.zeros(B, k, seen.shape[-1], device=n_B.device)
        prefix = prefix.scatter(-1, drafts_Bk.unsqueeze(-1), 1.0).cummax(dim=1).values > 0
        penalty_seen = seen_BV.unsqueeze(1) | torch.cat((torch.zeros_like(prefix[:, :1]), prefix), dim=1)
    logits = model.lm_head(hidden)
    if s.all_greedy:  # a draft survives iff it is the target's argmax, which is then the output
        tokens = process_logits(logits, s, penalty_seen).argmax(dim=-1)
        n_accepted = (drafts_Bk == tokens[:, :k]).long().cumprod(dim=1).sum(dim=1)
    else:
        p = probabilities(logits, s, penalty_seen)
        n_accepted, tokens = accept(p, q[:B], drafts_Bk, s, pos_BT + 1)
    if s.any_penalty:  # as in decode_step, seen matters only to rows with a penalty
        valid = torch.arange(k + 1, device=n_B.device) <= n_accepted.unsqueeze(1)
        seen_BV = mark_seen(seen_BV, tokens, valid)
        seen[:B] = seen_BV
    new_drafts, new_q = draft(model, cache, hidden, tokens, n_B, n_accepted, s, seen_BV, k)
    drafts[:B] = new_drafts
    if new_q is not None:
        q[:B] = new_q
    return n_accepted, tokens
