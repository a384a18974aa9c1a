"""Image input in the manner of DeepSeek-VL2: a SigLIP-style ViT, a 2x2-merging projector, the image-token layout.

An image reaches the language model as a run of `image_token_id` positions in the prompt. The
encoder sees square views of `image_size` pixels: always one global view (the whole image padded
to a square), plus, with dynamic tiling, a grid of local tiles cut from the image resized to the
candidate resolution that keeps the most detail. Every view becomes a grid of patch tokens; the
projector concatenates each 2x2 group into one token and maps it into the language model's width
through an MLP. DeepSeek-VL2's "2D" layout then lays the tokens out row by row:

    global view   h rows of (w tokens + 1 image_newline)
    separator     1 view_separator
    local tiles   (rows * h) rows of (cols * w tokens + 1 image_newline)   (only when tiled)

`merge_image_embeds` writes those runs into the text embeddings at the image-token positions.

Checkpoint keys (beside the language model's `model.*` and `lm_head.*`):
    vision.encoder.patch_embed.proj.{weight,bias}   Conv2d (width, channels, patch + 2*overlap, same),
                                                    or (width, stem_channels[-1], 1, 1) after a stem
    vision.encoder.patch_embed.stem.{6i,6i+3}.weight         the stem's 3x3 Conv2d (no bias), stage i
    vision.encoder.patch_embed.stem.{6i+1,6i+4}.{weight,bias,running_mean,running_var,num_batches_tracked}
    vision.encoder.pos_embed                        (1, grid*grid, width), learned
    vision.encoder.blocks.{i}.{norm1,norm2}.{weight,bias}
    vision.encoder.blocks.{i}.attn.{qkv,proj}.{weight,bias}
    vision.encoder.blocks.{i}.mlp.{fc1,fc2}.{weight,bias}
    vision.encoder.norm.{weight,bias}
    vision.projector.layers.{0,2,...}.{weight,bias}  Linear (4*width -> ... -> hidden_size)
    vision.image_newline, vision.view_separator     (hidden_size,)
DeepSeek-VL2's own checkpoints hold the same tensors as `vision.*` (timm names, as here),
`projector.*`, `image_newline` and `view_seperator` at the top level.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError


@dataclass
class VisionConfig:
    """The `vision_config` dict of a ModelConfig; defaults are DeepSeek-VL2's SigLIP-SO400M-384 tower."""

    image_size: int = 384  # side of the square view the encoder sees
    patch_size: int = 14
    # pixels each patch also sees past its cell on every side (zero-padded at the border); 0 is
    # SigLIP's non-overlapping patches. Overlap gives a from-scratch tower on tiny images the local
    # context a convolutional stem would (BreastMNIST val accuracy 0.83 -> 0.88 at 28 px, patch 4).
    patch_overlap: int = 0
    # a convolutional stem in place of the one patchify convolution ("early convolutions", Xiao et al.
    # 2021; the ViT paper's hybrid): one stage per entry, each two 3x3 convolutions with batch norm and
    # ReLU, the second of stride 2, so len(stem_channels) halvings make a patch; then a 1x1
    # convolution to the tower's width. [] is SigLIP's patchify stem. A tower trained from scratch on a
    # few hundred 28-px images lacks the locality a CNN builds in; the stem gives it back.
    stem_channels: list[int] = field(default_factory=list)
    num_channels: int = 3  # grayscale images are repeated into 3 channels when this is 3
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    downsample_ratio: int = 2  # the projector merges each ratio x ratio group of patch tokens into one
    projector_depth: int = 2  # Linear layers in the projector MLP
    projector_mlp_ratio: int = 1  # hidden width of the projector MLP, in units of the LM's hidden_size
    max_tiles: int = 9  # dynamic tiling: grids of m x n tiles with m * n <= max_tiles; 1 = global view only
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    def __post_init__(self):
        self.validate()

    @property
    def grid_size(self) -> int:
        """Patches along one side of a view (the patch convolution drops a remainder, as SigLIP's 384/14 does)."""
        return self.image_size // self.patch_size

    @property
    def merged_size(self) -> int:
        """Tokens along one side of a view after the projector's merge (odd grids are zero-padded first)."""
        return math.ceil(self.grid_size / self.downsample_ratio)

    def validate(self) -> None:
        def fail(name: str, why: str):
            raise ConfigError(f"config field 'vision_config.{name}' = {getattr(self, name)!r}: {why}")

        if not isinstance(self.patch_overlap, int) or isinstance(self.patch_overlap, bool) or self.patch_overlap < 0:
            fail("patch_overlap", "must be a non-negative integer")
        for name in ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size",
                     "num_hidden_layers", "num_attention_heads", "downsample_ratio", "projector_depth",
                     "projector_mlp_ratio", "max_tiles"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        if not isinstance(self.stem_channels, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.stem_channels
        ):
            fail("stem_channels", "must be a list of positive integers (channels of each stem stage)")
        if self.stem_channels:
            if 2 ** len(self.stem_channels) != self.patch_size:
                fail("stem_channels", f"each stage halves the image, so patch_size ({self.patch_size}) must be "
                                      f"2**len(stem_channels) = {2 ** len(self.stem_channels)}")
            if self.image_size % self.patch_size:
                fail("image_size", f"must be a multiple of patch_size ({self.patch_size}) with a convolutional stem")
            if self.patch_overlap:
                fail("patch_overlap", "applies to the patchify stem only; set it to 0 with stem_channels")
        if self.patch_size > self.image_size:
            fail("patch_size", f"cannot exceed image_size ({self.image_size})")
        if self.hidden_size % self.num_attention_heads:
            fail("num_attention_heads", f"must divide hidden_size ({self.hidden_size})")
        if self.projector_depth < 2:
            fail("projector_depth", "DeepSeek-VL2's projector has at least 2 layers (Linear, GELU, Linear)")
        if not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            fail("layer_norm_eps", "must be a positive number")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or len(value) != self.num_channels:
                fail(name, f"must be a list of num_channels ({self.num_channels}) numbers")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                fail(name, "must hold numbers")
        if not all(v > 0 for v in self.image_std):
            fail("image_std", "must be positive")

    @classmethod
    def from_dict(cls, raw: dict) -> "VisionConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config field 'vision_config' must be a JSON object, got {type(raw).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:  # a typo here would silently build a different tower
            raise ConfigError(f"config field 'vision_config' has unknown key(s) {unknown}; known: {sorted(names)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- layout ----------------------------------------------------------------------------------------
def image_token_count(vcfg: VisionConfig, tiles: tuple[int, int] = (0, 0)) -> int:
    """Positions one image fills in the prompt; tiles = (rows, cols) of local tiles, (0, 0) for none."""
    h = w = vcfg.merged_size
    count = h * (w + 1)  # global view with a newline after each row
    rows, cols = tiles
    if rows * cols:
        count += 1 + rows * h * (cols * w + 1)  # separator, then the tiles' rows with newlines
    return count


def candidate_resolutions(vcfg: VisionConfig) -> list[tuple[int, int]]:
    """(width, height) of every tile grid m x n with m * n <= max_tiles, as DeepSeek-VL2's candidate list."""
    S, n = vcfg.image_size, vcfg.max_tiles
    return [(cols * S, rows * S) for rows in range(1, n + 1) for cols in range(1, n + 1) if rows * cols <= n]


def select_best_resolution(size: tuple[int, int], candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate that keeps the most of the image's pixels once fitted inside it, then wastes the least.

    size and candidates are (width, height). An image is scaled to fit a candidate keeping its aspect
    ratio; its useful area is what survives (never more than the original), its waste the padding.
    """
    width, height = size
    best, best_useful, best_waste = None, -1, math.inf
    for cw, ch in candidates:
        scale = min(cw / width, ch / height)
        useful = min(int(width * scale) * int(height * scale), width * height)
        waste = cw * ch - useful
        if useful > best_useful or (useful == best_useful and waste < best_waste):
            best, best_useful, best_waste = (cw, ch), useful, waste
    return best


@dataclass
class ImageInput:
    """One preprocessed image: views[0] is the global view, views[1:] the local tiles row by row."""

    views: torch.Tensor  # (1 + rows * cols, C, S, S), normalised
    tiles: tuple[int, int] = (0, 0)  # (rows, cols) of local tiles; (0, 0): global view only

    def __post_init__(self):
        rows, cols = self.tiles
        if self.views.dim() != 4 or self.views.shape[0] != 1 + rows * cols:
            raise ValueError(
                f"ImageInput views of shape {tuple(self.views.shape)} do not match tiles {self.tiles}: "
                f"expected (1 + {rows}*{cols}, C, S, S)"
            )


# ---- encoder (timm's VisionTransformer names, as DeepSeek-VL2's SigLIP) -------------------------------
def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    """A 3x3 convolution, batch norm and ReLU (the norm follows, so the convolution needs no bias)."""
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class ConvStem(nn.Sequential):
    """Stages of (3x3 conv, BN, ReLU, 3x3 conv of stride 2, BN, ReLU): pixels -> a feature map 1/2**stages the size."""

    def __init__(self, vcfg: VisionConfig):
        layers: list[nn.Module] = []
        c_in = vcfg.num_channels
        for c in vcfg.stem_channels:
            layers += conv_bn_relu(c_in, c) + conv_bn_relu(c, c, stride=2)
            c_in = c
        super().__init__(*layers)


class PatchEmbed(nn.Module):
    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        p, o = vcfg.patch_size, vcfg.patch_overlap
        if vcfg.stem_channels:
            self.stem = ConvStem(vcfg)
            self.proj = nn.Conv2d(vcfg.stem_channels[-1], vcfg.hidden_size, kernel_size=1)
        else:
            self.stem = None
            self.proj = nn.Conv2d(vcfg.num_channels, vcfg.hidden_size, kernel_size=p + 2 * o, stride=p, padding=o)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            pixels = self.stem(pixels)  # (N, C, H, W) -> (N, C', H / patch, W / patch)
        return self.proj(pixels).permute(0, 2, 3, 1)  # -> (N, gh, gw, D)


class Attention(nn.Module):
    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.n_heads = vcfg.num_attention_heads
        self.qkv = nn.Linear(vcfg.hidden_size, 3 * vcfg.hidden_size)
        self.proj = nn.Linear(vcfg.hidden_size, vcfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, L, D = x.shape
        q, k, v = self.qkv(x).view(N, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x (N, H, L, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.proj(out.transpose(1, 2).reshape(N, L, D))


class Mlp(nn.Module):
    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(vcfg.hidden_size, vcfg.intermediate_size)
        self.fc2 = nn.Linear(vcfg.intermediate_size, vcfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's gelu_pytorch_tanh


class ViTBlock(nn.Module):
    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps)
        self.attn = Attention(vcfg)
        self.norm2 = nn.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps)
        self.mlp = Mlp(vcfg)
        self.drop_path = 0.0  # stochastic depth while training, set by the trainer; no effect in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._maybe_drop(self.attn(self.norm1(x)))
        return x + self._maybe_drop(self.mlp(self.norm2(x)))

    def _maybe_drop(self, branch: torch.Tensor) -> torch.Tensor:
        """Drop the whole residual branch for a random drop_path share of the images (rescaling the rest)."""
        if not self.training or self.drop_path == 0.0:
            return branch
        keep = torch.rand(branch.shape[0], 1, 1, device=branch.device) >= self.drop_path
        return branch * keep.to(branch.dtype) / (1.0 - self.drop_path)


class VisionTransformer(nn.Module):
    """SigLIP-style ViT without a class token or pooling head: pixels -> a grid of patch features."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        self.grid_size = vcfg.grid_size
        self.patch_embed = PatchEmbed(vcfg)
        self.pos_embed = nn.Parameter(torch.empty(1, vcfg.grid_size**2, vcfg.hidden_size))
        self.blocks = nn.ModuleList(ViTBlock(vcfg) for _ in range(vcfg.num_hidden_layers))
        self.norm = nn.LayerNorm(vcfg.hidden_size, eps=vcfg.layer_norm_eps)

    def position_embeddings(self, gh: int, gw: int) -> torch.Tensor:
        """(1, gh * gw, D): the learned grid, bicubically resized when the input grid differs from it."""
        if (gh, gw) == (self.grid_size, self.grid_size):
            return self.pos_embed
        G, D = self.grid_size, self.pos_embed.shape[-1]
        grid = self.pos_embed.reshape(1, G, G, D).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, D).to(self.pos_embed.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)  # (N, gh, gw, D)
        N, gh, gw, D = x.shape
        x = x.reshape(N, gh * gw, D) + self.position_embeddings(gh, gw)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).view(N, gh, gw, D)


class MlpProjector(nn.Module):
    """DeepSeek-VL2's downsample_mlp_gelu: concatenate each 2x2 group of patch features, then an MLP."""

    def __init__(self, vcfg: VisionConfig, lm_hidden_size: int):
        super().__init__()
        self.ratio = vcfg.downsample_ratio
        width = lm_hidden_size * vcfg.projector_mlp_ratio
        layers: list[nn.Module] = [nn.Linear(vcfg.hidden_size * self.ratio**2, width)]
        for _ in range(vcfg.projector_depth - 2):
            layers += [nn.GELU(), nn.Linear(width, width)]
        layers += [nn.GELU(), nn.Linear(width, lm_hidden_size)]
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (N, gh, gw, C) -> (N, h, w, D) with h = ceil(gh / ratio), w = ceil(gw / ratio)."""
        N, gh, gw, C = features.shape
        r = self.ratio
        x = F.pad(features, (0, 0, 0, -gw % r, 0, -gh % r))  # zero-pad odd grids, as DeepSeek-VL2
        h, w = x.shape[1] // r, x.shape[2] // r
        # F.unfold orders each merged vector as (channel, row in group, column in group), as VL2's weights expect
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=r, stride=r)  # (N, C*r*r, h*w)
        return self.layers(x.transpose(1, 2)).view(N, h, w, -1)


class VisionModel(nn.Module):
    """Encoder + projector + the layout's two learned tokens: images -> their runs of LM input embeddings."""

    def __init__(self, vcfg: VisionConfig, lm_hidden_size: int):
        super().__init__()
        self.vcfg = vcfg
        self.encoder = VisionTransformer(vcfg)
        self.projector = MlpProjector(vcfg, lm_hidden_size)
        self.image_newline = nn.Parameter(torch.empty(lm_hidden_size))
        self.view_separator = nn.Parameter(torch.empty(lm_hidden_size))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """SigLIP's (big_vision) initialisation: Xavier-uniform dense layers, LeCun-normal patch
        embedding, position embeddings N(0, 1/width), zero biases, unit LayerNorms."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                bound = math.sqrt(6 / (fan_in + fan_out))
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, fan_in**-0.5, generator=generator)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # unit scale, zero shift, fresh running statistics
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        width = self.encoder.pos_embed.shape[-1]
        self.encoder.pos_embed.normal_(0.0, width**-0.5, generator=generator)
        # DeepSeek-VL2 draws the layout tokens with std 1/sqrt(hidden_size)
        D = self.image_newline.shape[0]
        self.image_newline.normal_(0.0, D**-0.5, generator=generator)
        self.view_separator.normal_(0.0, D**-0.5, generator=generator)

    def forward(self, images: list[ImageInput]) -> torch.Tensor:
        """All images' runs, concatenated in order: (sum of image_token_count, D)."""
        if not images:
            return self.image_newline.new_zeros(0, self.image_newline.shape[0])
        param = self.encoder.pos_embed
        views = torch.cat([im.views for im in images]).to(device=param.device, dtype=param.dtype)
        tokens = self.projector(self.encoder(views))  # (all views, h, w, D)
        n_views, h, w, D = tokens.shape
        first = torch.tensor([0] + [im.views.shape[0] for im in images]).cumsum(0)[:-1].tolist()
        newline = self.image_newline.to(tokens.dtype)
        # global views of every image at once: h rows of (w tokens + newline)
        glob = torch.cat([tokens[first], newline.expand(len(images), h, 1, D)], dim=2).reshape(len(images), -1, D)
        if all(im.tiles == (0, 0) for im in images):
            return glob.reshape(-1, D)
        runs = []
        for i, (im, start) in enumerate(zip(images, first)):
            runs.append(glob[i])
            rows, cols = im.tiles
            if rows * cols == 0:
                continue
            local = tokens[start + 1 : start + 1 + rows * cols]  # (rows*cols, h, w, D), tiles row by row
            local = local.view(rows, cols, h, w, D).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, D)
            local = torch.cat([local, newline.expand(rows * h, 1, D)], dim=1).reshape(-1, D)
            runs += [self.view_separator.to(tokens.dtype)[None], local]
        return torch.cat(runs)


def merge_image_embeds(inputs_embeds: torch.Tensor, image_mask: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """Write image_embeds (N, D) into inputs_embeds (B, T, D) at image_mask (B, T) True, in row-major order."""
    n_slots = int(image_mask.sum())
    if n_slots != image_embeds.shape[0]:
        raise ValueError(
            f"the prompt has {n_slots} image-token positions but its images fill {image_embeds.shape[0]}; "
            "expand each <image> with expand_image_tokens (one run of image_token_count(...) per image)"
        )
    return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), image_embeds.to(inputs_embeds.dtype))


def expand_image_tokens(
    ids: list[int], image_token_id: int, images: list[ImageInput], vcfg: VisionConfig
) -> list[int]:
    """Token ids with one `<image>` per image -> each `<image>` replaced by that image's run of positions."""
    n_placeholders = sum(1 for t in ids if t == image_token_id)
    if n_placeholders != len(images):
        raise ValueError(f"the prompt has {n_placeholders} <image> placeholder(s) but {len(images)} image(s) were given")
    out: list[int] = []
    it = iter(images)
    for t in ids:
        if t == image_token_id:
            out += [image_token_id] * image_token_count(vcfg, next(it).tiles)
        else:
            out.append(t)
    return out
