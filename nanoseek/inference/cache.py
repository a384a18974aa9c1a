"""The static latent KV cache: what MLA keeps per token, preallocated once.

Per layer and token MLA needs only `MLA.latent_kv`'s output: the normalised compressed kv
(kv_lora_rank values) and the roped key shared by all heads (qk_rope_head_dim values), 576 values at
DeepSeek-V3 size instead of 2 x 128 heads x 192 for expanded keys and values. The MTP modules are
transformer blocks too, so each gets its own layer of cache after the main model's layers.

Layout (layers, slots, max_len, R): a slot is one sequence; a token's latent lives at its position,
so a query at position p attends to slots[:, :p + 1]. Entries past a sequence's length may hold
stale values from a longer draft or a padded prefill; the position mask never reads them, and the
next token written at that position overwrites them.
"""

import torch

from ..config import ModelConfig


class LatentCache:
    def __init__(self, config: ModelConfig, n_slots: int, max_len: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        if n_slots <= 0 or max_len <= 0:
            raise ValueError(f"a cache needs n_slots > 0 and max_len > 0, got n_slots={n_slots}, max_len={max_len}")
        self.config = config
        self.n_layers = config.num_hidden_layers + config.num_nextn_predict_layers  # MTP modules last
        self.latent_dim = config.kv_lora_rank + config.qk_rope_head_dim
        self.n_slots, self.max_len = n_slots, max_len
        self.kv = torch.zeros(self.n_layers, n_slots, max_len, self.latent_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> torch.Tensor:
        """Cache of main-model layer i, (n_slots, max_len, R)."""
        return self.kv[i]

    def mtp_layer(self, k: int) -> torch.Tensor:
        """Cache of MTP module k (0-based), (n_slots, max_len, R)."""
        return self.kv[self.config.num_hidden_layers + k]

    @property
    def bytes_per_token_per_layer(self) -> int:
        return self.latent_dim * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst (engine compaction)."""
        self.kv[:, dst, :length] = self.kv[:, src, :length]
