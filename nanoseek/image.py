"""Images in: decode with Pillow, refuse bad input, cut the encoder's views, normalise.

    image = load_image("scan.png")                 # a path, bytes, a data URL or base64 text
    inputs = preprocess(image, VisionConfig(...))  # -> ImageInput: global view (+ tiles), normalised
    ids, images = chat_prompt(tok, messages, model.config)   # OpenAI-style messages with image parts
    embeds = model.embed_multimodal(torch.tensor([ids]), images)  # -> inputs_embeds for the model

Preprocessing follows DeepSeek-VL2: the global view is the whole image resized to fit the square
base size and padded with the mean colour; with dynamic tiling (max_tiles > 1) an image larger
than the base size is also resized and padded to the best candidate resolution and cut into tiles.
Grayscale images are repeated into RGB when the encoder takes 3 channels. This lives outside the
model and the engine, which only ever see tensors and token ids.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .model.vision import ImageInput, VisionConfig, candidate_resolutions, expand_image_tokens, select_best_resolution

# Formats with well-kept decoders that images on the web and in medical datasets come in.
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (decompression bombs)
MAX_ENCODED_BYTES = 20 * 2**20  # largest base64 payload or file accepted
_BASE64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


class ImageError(ValueError):
    """An image could not be used: unreadable, corrupt, unsupported, or too large; says which."""


def load_image(source, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_ENCODED_BYTES) -> Image.Image:
    """Decode an image from a path, bytes, a `data:image/...;base64,` URL, base64 text, or a PIL image."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "image")
        return source
    name = "image"
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, str) and text[:5].lower() == "data:":  # the scheme is case-insensitive
            data, name = decode_data_url(text, max_bytes=max_bytes), "data URL"
        elif len(text) < 4096 and is_file(text):
            name = text
            try:
                size = Path(text).stat().st_size
                if size > max_bytes:
                    raise ImageError(f"{name}: file of {size} bytes is over the {max_bytes}-byte limit")
                data = Path(text).read_bytes()
            except OSError as e:  # no permission, an I/O error: the file named, not a traceback
                raise ImageError(f"{name}: cannot read the image file ({e.strerror or e})") from None
        elif isinstance(text, str) and len(text) >= 64 and _BASE64_RE.match(text[:4096]):
            try:
                data, name = _b64decode(text, max_bytes, "base64 image"), "base64 image"
            except _NotBase64:
                data = b""
            if not _is_image(data):  # a long path of letters, '/' and '-' (no dot) is base64's alphabet too
                raise ImageError(f"no such image file, and not base64 of an image either: {text[:200]!r}")
        else:
            raise ImageError(f"no such image file: {text[:200]!r}")
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes is over the {max_bytes}-byte limit")
    return _decode(data, name, max_pixels)


def is_file(path) -> bool:
    """Whether path names a file; False, not an OSError, for text that cannot be a path (base64 of
    a dark image has no '/' for over 255 characters, a file name too long for the file system)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def decode_data_url(url: str, *, max_bytes: int = MAX_ENCODED_BYTES) -> bytes:
    """The bytes of an OpenAI-style `image_url` data URL, `data:image/png;base64,....`.

    Remote http(s) URLs are refused: fetching them would let a request make the server reach any host.
    """
    if not isinstance(url, str):
        raise ImageError(f"image_url must be a string, got {type(url).__name__}")
    if url[:8].lower().startswith(("http://", "https://")):
        raise ImageError("image_url must be a data URL (data:image/...;base64,...); remote URLs are not fetched")
    # scheme, media type and ";base64" match case-insensitively, as browsers read them (WHATWG fetch)
    match = re.match(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]+)*)(; *base64)?,", url, re.IGNORECASE)
    if not match:
        raise ImageError(f"image_url is not a data URL: {url[:40]!r}...")
    mime, _, is_base64 = match.groups()
    if mime is not None and not mime.lower().startswith("image/"):
        raise ImageError(f"data URL holds {mime!r}, not an image")
    if not is_base64:
        raise ImageError("data URL must be base64-encoded (data:image/...;base64,...)")
    return _b64decode(url[match.end():], max_bytes, "data URL")


class _NotBase64(ImageError):
    """The text is not base64 (as opposed to base64 over the size limit)."""


def _b64decode(text: str, max_bytes: int, name: str) -> bytes:
    if len(text) * 3 // 4 > max_bytes:
        raise ImageError(f"{name}: about {len(text) * 3 // 4} bytes is over the {max_bytes}-byte limit")
    text = re.sub(r"\s+", "", text)
    # the '=' padding is optional, as in browsers' forgiving base64 (WHATWG): some clients strip it
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _NotBase64(f"{name}: invalid base64 ({e})") from e


# the first bytes of the common formats: an image that Pillow cannot even open (a corrupt header)
# is still an image, and its error should say so
# (signatures long enough that ordinary text decoded as base64 does not match them by chance)
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


def _is_image(data: bytes) -> bool:
    """Whether the bytes begin like an image of any format Pillow knows (header only)."""
    if data.startswith(_IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return True
    except Exception:
        return False
    return True


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h} pixels is over the pixel limit of {max_pixels} (decompression bomb?)")


def _decode(data: bytes, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
    except UnidentifiedImageError:
        raise ImageError(_unidentified(data, name)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: over the pixel limit (decompression bomb?): {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # a corrupt header: "Truncated IHDR chunk" is a ValueError
        raise ImageError(f"{name}: unreadable image ({e})") from None
    _check_pixels(image.size, max_pixels, f"{name} ({image.format})")
    try:
        image.load()  # the pixel decode, where truncated or corrupt files fail
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"{name}: corrupt or truncated {image.format} image ({e})") from None
    try:
        return ImageOps.exif_transpose(image)  # photos store their rotation in EXIF
    except Exception:  # Pillow's EXIF parser raises SyntaxError, struct.error, KeyError, ...
        return image  # a malformed EXIF block is metadata lost, not a bad image: keep it as stored


def _unidentified(data: bytes, name: str) -> str:
    """Say whether the bytes are an image in a format we refuse, or no image at all."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fmt = Image.open(io.BytesIO(data)).format  # any format Pillow knows, header only
    except Exception:
        fmt = None
    if fmt:
        return f"{name}: image format {fmt} is not supported; use one of {', '.join(SUPPORTED_FORMATS)}"
    return f"{name}: not a readable image (corrupt, or not one of {', '.join(SUPPORTED_FORMATS)})"


def background(vcfg: VisionConfig) -> tuple[int, ...]:
    """The padding colour: the normalisation mean, so padding normalises to zero (as DeepSeek-VL2)."""
    return tuple(int(round(m * 255)) for m in vcfg.image_mean)


def to_mode(image: Image.Image, vcfg: VisionConfig) -> Image.Image:
    """Convert to the encoder's channels: 'RGB' for 3 (grayscale repeated), 'L' for 1."""
    target = "RGB" if vcfg.num_channels == 3 else "L"
    if vcfg.num_channels not in (1, 3):
        raise ImageError(f"vision_config.num_channels = {vcfg.num_channels}: images have 1 or 3 channels")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float scans (common in medical imaging): stretch their own range onto 0..255
        pixels = np.asarray(image, dtype=np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        pixels = (pixels - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(pixels)
        image = Image.fromarray(pixels.round().astype(np.uint8), mode="L")
    # a tRNS colour (L, RGB or P PNGs, GIFs) is transparency too: convert("RGBA") applies it
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        fill = background(vcfg) * (3 // vcfg.num_channels)  # transparent areas take the padding colour
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, fill + (255,)), rgba)
    return image if image.mode == target else image.convert(target)


def normalize(views: list[Image.Image], vcfg: VisionConfig) -> torch.Tensor:
    """PIL views -> (N, C, S, S) float32, (pixel / 255 - mean) / std."""
    pixels = np.stack([np.asarray(v, dtype=np.float32) for v in views]) / 255.0  # (N, S, S[, C])
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    mean = np.asarray(vcfg.image_mean, dtype=np.float32)
    std = np.asarray(vcfg.image_std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(0, 3, 1, 2).copy())


def preprocess(image, vcfg: VisionConfig) -> ImageInput:
    """Any image `load_image` takes -> the encoder's views: a global view, plus tiles when tiling applies."""
    image = to_mode(load_image(image), vcfg)
    S, color = vcfg.image_size, background(vcfg)
    color = color if image.mode == "RGB" else color[0]
    views = [ImageOps.pad(image, (S, S), method=Image.Resampling.BICUBIC, color=color)]
    tiles = (0, 0)
    # a single tile would only repeat the global view, so tiling starts above the base size
    if vcfg.max_tiles > 1 and (image.width > S or image.height > S):
        width, height = select_best_resolution(image.size, candidate_resolutions(vcfg))
        big = ImageOps.pad(image, (width, height), method=Image.Resampling.BICUBIC, color=color)
        rows, cols = height // S, width // S
        views += [big.crop((c * S, r * S, (c + 1) * S, (r + 1) * S)) for r in range(rows) for c in range(cols)]
        tiles = (rows, cols)
    return ImageInput(normalize(views, vcfg), tiles)


# ---- prompts with images ---------------------------------------------------------------------------
def message_images(messages: list[dict]) -> list:
    """The image sources of OpenAI-style messages, in prompt order: `image_url` parts (data URLs, as
    the chat completions API sends them) and `image` parts (a path, bytes or PIL image, for Python callers).

    The chat format renders every system message first, so their images come first too, whatever
    the messages' order: each image must land on the run of its own <image> mark."""
    sources = []
    for m in sorted(messages, key=lambda m: not (isinstance(m, dict) and m.get("role") == "system")):  # stable
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                sources.append(decode_data_url(url))
            elif kind == "image":
                sources.append(part.get("image"))
    return sources


def chat_prompt(tokenizer, messages: list[dict], config, *, add_generation_prompt: bool = True) -> tuple[list[int], list[ImageInput]]:
    """Chat messages with image parts -> (prompt ids with each image's run of image_token_id, the images).

    `config` is the model's ModelConfig; a model without a vision_config refuses images (and reads a
    literal "<image>" in the text as an ordinary token). For a vision model every <image> mark must
    have its image: a literal "<image>" typed into a text-only request is refused. The ids and images
    go to `model.embed_multimodal` (or any engine that takes inputs_embeds for a prompt).
    """
    sources = message_images(messages)
    ids = tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    if config.vision_config is None:
        if sources:
            raise ImageError("this model has no vision encoder, so it does not take images")
        return ids, []
    if sources and (tokenizer.image_id is None or tokenizer.image_id != config.image_token_id):
        raise ImageError(f"the tokenizer's <image> id ({tokenizer.image_id}) is not the model's image_token_id "
                         f"({config.image_token_id})")
    marks = ids.count(config.image_token_id)
    if marks != len(sources):  # e.g. a literal "<image>" typed into the text
        raise ImageError(f"the prompt holds {marks} <image> mark(s) but {len(sources)} image(s) were given "
                         "(a literal \"<image>\" in the text counts as a mark)")
    if not sources:
        return ids, []
    vcfg = VisionConfig.from_dict(config.vision_config)
    images = [preprocess(source, vcfg) for source in sources]
    return expand_image_tokens(ids, config.image_token_id, images, vcfg), images
