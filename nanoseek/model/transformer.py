"""The DeepSeek-V3 language model: embeddings, decoder blocks, final norm, output head, MTP modules.

Module names follow the Hugging Face DeepseekV3 checkpoint layout (`model.layers.3.self_attn...`),
so a state dict maps onto checkpoint keys by name, except for the stacked routed experts and the
MTP modules, which `nanoseek.checkpoint` converts. With `config.vision_config` set, the model also
holds a vision encoder and projector (`self.vision`, DeepSeek-VL2 manner; see model/vision.py), and
`embed_multimodal` turns token ids plus images into the `inputs_embeds` that `forward` takes.
"""

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block
from .layers import RMSNorm
from .moe import Experts, Router
from .mtp import MTPLayer
from .rope import RotaryEmbedding
from .vision import ImageInput, VisionConfig, VisionModel, merge_image_embeds


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepSeekModel(nn.Module):
    """Call with token ids (B, T) to get logits (B, T, vocab_size)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, L + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        self.vision = None
        if config.vision_config is not None:
            self.vision = VisionModel(VisionConfig.from_dict(config.vision_config), config.hidden_size)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """DeepSeek's initialisation: N(0, initializer_range) for every matrix, ones for norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=generator)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Experts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
        self.rotary.reset_buffers()
        if self.vision is not None:
            self.vision.init_weights(generator)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def embed_multimodal(self, input_ids: torch.Tensor, images: list[ImageInput]) -> torch.Tensor:
        """input_ids (B, T) holding each image's run of image_token_id (vision.expand_image_tokens), and
        the images in order of appearance, row by row -> inputs_embeds (B, T, D) for forward."""
        if self.vision is None:
            raise ValueError("this model has no vision encoder (its config has no vision_config)")
        image_mask = input_ids == self.config.image_token_id
        return merge_image_embeds(self.embed(input_ids), image_mask, self.vision(images))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        return_hidden: bool = False,
    ):
        """input_ids (B, T) or inputs_embeds (B, T, D) -> logits (B, T, V).

        positions (B or 1, T) default to 0..T-1; mask is None (causal) or bool (B, T, T), True =
        attend. With return_hidden, also returns the final-normed hidden states (B, T, D) that feed
        the head and the MTP modules.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        cos, sin = self.rotary(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        hidden = self.model.norm(x)
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def mtp_forward(self, hidden: torch.Tensor, input_ids: torch.Tensor, depth: int | None = None) -> list[torch.Tensor]:
        """Run the MTP modules over a training window.

        hidden (B, T, D) is `forward(..., return_hidden=True)[1]` for input_ids (B, T). Module k
        returns logits (B, T-k, V) whose row i predicts token i+k+1 of the stream, i.e. the targets
        `labels[:, k:]` where labels are the main model's next-token targets.
        """
        depth = len(self.mtp) if depth is None else depth
        if depth > len(self.mtp):
            raise ValueError(f"MTP depth {depth} requested but the model has {len(self.mtp)} MTP modules")
        T = input_ids.shape[1]
        outputs, h = [], hidden
        for k in range(1, depth + 1):
            layer = self.mtp[k - 1]
            positions = torch.arange(T - k, device=hidden.device).unsqueeze(0)
            cos, sin = self.rotary(positions)
            h = layer(h[:, : T - k], self.embed(input_ids[:, k:]), cos, sin)
            outputs.append(self.lm_head(layer.shared_head.norm(h)))
        return outputs


def build_model(
    config: ModelConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int | None = 0,
    init: bool = True,
) -> DeepSeekModel:
    """Allocate a model without torch's default per-layer init, then DeepSeek's init (or none)."""
    with torch.device("meta"):
        model = cast_model(DeepSeekModel(config), dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage
    if init:
        generator = torch.Generator(device=device)
        if seed is not None:
            generator.manual_seed(seed)
        model.init_weights(generator)
    else:
        model.rotary.reset_buffers()
    return model


def cast_model(model: DeepSeekModel, dtype: torch.dtype) -> DeepSeekModel:
    """Cast to dtype, keeping router weights and correction biases in fp32 as DeepSeek does."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()
    return model
