"""Per-request sampling settings, applied to a whole batch at once.

Each row of a batch has its own temperature, top-k, top-p, min-p, repetition penalty and seed, held
as (B,) tensors, so one set of tensor ops serves every request with no Python loop over rows and no
host sync. Temperature 0 means greedy, and so does any temperature below GREEDY_BELOW: dividing the
logits by one that small overflows fp32 to inf (1e-40 gave token 0 forever), as vLLM also found.

Randomness is counter-based: the noise for the token at position p of a request is a hash of
(seed, p, stream, token id), not a draw from a shared generator. A seed then reproduces the same
tokens whatever other requests share the batch, whenever the request joins, and however many
tokens a speculative step accepts. (torch.multinomial with one torch.Generator per row would need a
Python loop over the rows every step.) Sampling itself is the Gumbel-max trick: argmax(logits / T
+ Gumbel noise) is a draw from softmax(logits / T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

# Independent noise streams, so drafting, accepting and resampling the same position never share noise.
TARGET, DRAFT, ACCEPT = 0, 1, 2
_MASK32 = 0xFFFFFFFF
GREEDY_BELOW = 1e-5  # vLLM's threshold
INT64_LIMIT = 2**63  # top_k and seed become int64 tensors


class SamplingError(ValueError):
    """A sampling parameter out of range; `param` names it (the server answers 400 with that name)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL-style, as transformers: divide positive logits, multiply negative ones
    seed: int | None = None  # None: drawn from torch's global generator when the request is submitted

    def __post_init__(self):
        def fail(name, why):
            raise SamplingError(f"sampling parameter {name}={getattr(self, name)!r}: {why}", name)

        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < float("inf"):
            fail("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k < INT64_LIMIT:
            fail("top_k", "must be an integer in [0, 2**63) (0 means no limit)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not isinstance(self.repetition_penalty, (int, float)) or not 1e-6 <= self.repetition_penalty <= 1e6:
            # bounded so that the penalised fp32 logits stay finite: 1e-40 rounds to 0 in fp32 and
            # divides positive logits into inf (NaN probabilities for speculative sampling)
            fail("repetition_penalty", "must be a number in [1e-6, 1e6] (1 means none)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < INT64_LIMIT):
            fail("seed", "must be an integer in [0, 2**63) or None")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def with_seed(self) -> "SamplingParams":
        """A copy whose seed is fixed (drawn from torch's global generator if it was None)."""
        if self.seed is not None:
            return self
        seed = int(torch.randint(0, 2**62, ()).item())
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty, seed)


class SamplingBatch(NamedTuple):
    """The settings of B rows as tensors; the flags let a step skip work no row needs."""

    temperature: torch.Tensor  # (B,) fp32, 0 = greedy (also for rows whose temperature is below GREEDY_BELOW)
    top_k: torch.Tensor  # (B,) long
    top_p: torch.Tensor  # (B,) fp32
    min_p: torch.Tensor  # (B,) fp32
    penalty: torch.Tensor  # (B,) fp32
    seed: torch.Tensor  # (B,) long
    all_greedy: bool
    any_filter: bool  # some row uses top-k, top-p or min-p
    any_penalty: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device="cpu") -> "SamplingBatch":
        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            tensor([0.0 if p.greedy else p.temperature for p in params], torch.float32),
            tensor([p.top_k for p in params], torch.long),
            tensor([p.top_p for p in params], torch.float32),
            tensor([p.min_p for p in params], torch.float32),
            tensor([p.repetition_penalty for p in params], torch.float32),
            tensor([p.seed or 0 for p in params], torch.long),
            all(p.greedy for p in params),
            any(p.top_k or p.top_p < 1 or p.min_p > 0 for p in params),
            any(p.repetition_penalty != 1 for p in params),
        )


# ---- counter-based noise -------------------------------------------------------------------------
def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x < 2^32 held in int64, split so no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (Chris Wellons' integer hash): a bijection on 32-bit values with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed_B: torch.Tensor, pos_BT: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """Uniform (0, 1) noise (B, T, n), a pure function of (seed, position, stream, index)."""
    h = _hash32(seed_B & _MASK32) ^ (seed_B >> 32)
    h = _hash32(_hash32(h).unsqueeze(1) ^ pos_BT)
    h = _hash32(h ^ stream).unsqueeze(-1)
    index = torch.arange(n, device=seed_B.device)
    bits = _hash32(_hash32(h ^ index) + 0x9E3779B9)
    return ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in fp32, strictly inside (0, 1)


def gumbel_noise(seed_B, pos_BT, stream, n) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(seed_B, pos_BT, stream, n)))


# ---- logits processing ---------------------------------------------------------------------------
def apply_penalty(logits: torch.Tensor, penalty_B: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V); seen (B, T, V) or (B, 1, V) bool, tokens already in the sequence."""
    p = penalty_B.view(-1, 1, 1)
    penalised = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, s: SamplingBatch) -> torch.Tensor:
    """Temperature-scaled logits (B, T, V) -> the same with tokens outside top-k / top-p / min-p at -inf.

    Applied in that order, each on the distribution the previous one left, as transformers does.
    """
    V = logits.shape[-1]
    top_k = s.top_k.view(-1, 1, 1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(V, device=logits.device)
    remove = (top_k > 0) & (rank >= top_k)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    top_p = s.top_p.view(-1, 1, 1)
    # keep the smallest prefix reaching top_p (a token goes once the mass before it reaches top_p,
    # as transformers and vLLM: 2 of 4 equal tokens for 0.5); skipped at 1 where rounding could bite
    # the most likely token always stays, even for a top_p so small it rounds to 0 in fp32
    remove = remove | ((top_p < 1) & (probs.cumsum(dim=-1) - probs >= top_p) & (rank > 0))
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    remove = remove | (probs < s.min_p.view(-1, 1, 1) * probs[..., :1])
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def process_logits(logits: torch.Tensor, s: SamplingBatch, seen: torch.Tensor | None) -> torch.Tensor:
    """Raw logits (B, T, V) -> what a row samples from: penalised, / temperature (1 for greedy rows), filtered."""
    logits = logits.float()
    if s.any_penalty:
        logits = apply_penalty(logits, s.penalty, seen)
    if s.all_greedy:
        return logits
    temperature = torch.where(s.temperature > 0, s.temperature, 1.0).view(-1, 1, 1)
    logits = logits / temperature
    return filter_logits(logits, s) if s.any_filter else logits


def sample(logits: torch.Tensor, s: SamplingBatch, seen: torch.Tensor | None, pos_BT: torch.Tensor,
           stream: int = TARGET) -> torch.Tensor:
    """Raw logits (B, T, V) for the tokens at positions pos_BT -> sampled ids (B, T)."""
    logits = process_logits(logits, s, seen)
    greedy = logits.argmax(dim=-1)
    if s.all_greedy:
        return greedy
    drawn = (logits + gumbel_noise(s.seed, pos_BT, stream, logits.shape[-1])).argmax(dim=-1)
    return torch.where(s.temperature.view(-1, 1) > 0, drawn, greedy)


def probabilities(logits: torch.Tensor, s: SamplingBatch, seen: torch.Tensor | None) -> torch.Tensor:
    """The distribution each row samples from, (B, T, V) fp32; one-hot at the argmax for greedy rows."""
    logits = process_logits(logits, s, seen)
    one_hot = torch.zeros_like(logits).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    if s.all_greedy:
        return one_hot
    return torch.where(s.temperature.view(-1, 1, 1) > 0, logits.softmax(dim=-1), one_hot)


def sample_from(probs: torch.Tensor, s: SamplingBatch, pos_BT: torch.Tensor, stream: int) -> torch.Tensor:
    """Draw from given distributions (B, T, V) with the rows' counter-based noise -> ids (B, T)."""
    return (probs.log() + gumbel_noise(s.seed, pos_BT, stream, probs.shape[-1])).argmax(dim=-1)
