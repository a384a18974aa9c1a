"""Image preprocessing: grayscale and RGB, tiling, data URLs, and bad images refused with clear errors."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from nanoseek.image import ImageError, decode_data_url, load_image, preprocess
from nanoseek.model.vision import VisionConfig

VCFG = VisionConfig(image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, max_tiles=4, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.5])


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def gray(h=16, w=16, seed=0):
    return (np.random.default_rng(seed).random((h, w)) * 255).astype(np.uint8)


def test_grayscale_is_repeated_into_three_normalised_channels():
    pixels = gray()
    out = preprocess(encode(Image.fromarray(pixels)), VCFG)
    assert out.tiles == (0, 0) and out.views.shape == (1, 3, 16, 16) and out.views.dtype == torch.float32
    for c in range(3):
        expected = (pixels / 255.0 - VCFG.image_mean[c]) / VCFG.image_std[c]
        assert np.allclose(out.views[0, c].numpy(), expected, atol=1e-6)


def test_rgb_keeps_its_channel_order():
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 255, 128, 0
    out = preprocess(encode(Image.fromarray(pixels), "PNG"), VCFG).views[0]
    assert np.allclose(out[:, 0, 0].numpy(), [(1 - 0.5) / 0.2, (128 / 255 - 0.4) / 0.25, (0 - 0.3) / 0.5], atol=1e-6)
    jpeg = preprocess(encode(Image.fromarray(pixels), "JPEG"), VCFG).views[0]
    assert (jpeg[0] > jpeg[1]).all() and (jpeg[1] > jpeg[2]).all()  # lossy, but still red > green > blue


def test_one_channel_encoder_gets_one_channel():
    vcfg = VisionConfig(**{**VCFG.to_dict(), "num_channels": 1, "image_mean": [0.5], "image_std": [0.5]})
    rgb = np.zeros((16, 16, 3), np.uint8) + np.array([255, 0, 0], np.uint8)
    out = preprocess(Image.fromarray(rgb), vcfg).views
    assert out.shape == (1, 1, 16, 16)
    assert np.allclose(out.numpy(), (76 / 255 - 0.5) / 0.5, atol=1e-6)  # ITU-R 601 luma of pure red


def test_small_non_square_image_is_padded_with_the_mean():
    out = preprocess(Image.fromarray(gray(8, 16)), VCFG).views[0]  # resized to 16 wide, 8 tall, then padded
    assert out.shape == (3, 16, 16)
    assert np.allclose(out[:, :4].numpy(), [[[(round(0.5 * 255) / 255 - 0.5) / 0.2]], [[(102 / 255 - 0.4) / 0.25]],
                                             [[(round(0.3 * 255) / 255 - 0.3) / 0.5]]], atol=1e-6)


def test_large_image_is_tiled_plus_a_global_view():
    rgb = (np.random.default_rng(1).random((16, 40, 3)) * 255).astype(np.uint8)  # 40 wide, 16 tall
    out = preprocess(Image.fromarray(rgb), VCFG)
    assert out.tiles == (1, 3)  # 48x16 keeps every pixel with the least padding
    assert out.views.shape == (4, 3, 16, 16)
    # the tiles, side by side, are the image resized to fit 48x16 (here: exactly 40 -> 40, padded to 48)
    from PIL import ImageOps

    big = ImageOps.pad(Image.fromarray(rgb), (48, 16), method=Image.Resampling.BICUBIC, color=(128, 102, 76))
    expected = preprocess(big.crop((16, 0, 32, 16)), VisionConfig(**{**VCFG.to_dict(), "max_tiles": 1})).views[0]
    assert torch.allclose(out.views[2], expected, atol=1e-6)
    no_tiling = VisionConfig(**{**VCFG.to_dict(), "max_tiles": 1})
    assert preprocess(Image.fromarray(rgb), no_tiling).tiles == (0, 0)


def test_sixteen_bit_and_transparent_images_are_converted():
    deep = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 200))
    assert deep.mode.startswith("I")
    out = preprocess(deep, VCFG).views[0, 0]
    assert out.min() == pytest.approx((0 - 0.5) / 0.2) and out.max() == pytest.approx((1 - 0.5) / 0.2)
    clear = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    assert preprocess(clear, VCFG).views.abs().max() < 0.02  # fully transparent -> the padding colour


def test_paths_data_urls_and_base64_text(tmp_path):
    png = encode(Image.fromarray(gray()))
    (tmp_path / "a.png").write_bytes(png)
    expected = np.asarray(Image.open(io.BytesIO(png)))
    text = base64.b64encode(png).decode()
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), png, f"data:image/png;base64,{text}", text):
        assert np.array_equal(np.asarray(load_image(source)), expected)
    assert decode_data_url(f"data:image/png;base64,{text}") == png


@pytest.mark.parametrize("url, message", [
    ("https://example.com/a.png", "remote URLs are not fetched"),
    ("data:text/plain;base64,aGVsbG8=", "not an image"),
    ("data:image/png,rawbytes", "base64"),
    ("data:image/png;base64,@@@@", "invalid base64"),
    ("image.png", "not a data URL"),
])
def test_bad_data_urls_are_refused(url, message):
    with pytest.raises(ImageError, match=message):
        decode_data_url(url)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, followed by an empty pixel-data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def test_bad_images_are_refused_with_clear_errors(tmp_path):
    png = encode(Image.fromarray(gray(64, 64)))
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(b"this is not an image at all")
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        load_image(png[: len(png) // 2])
    with pytest.raises(ImageError, match="format TIFF is not supported"):
        load_image(encode(Image.fromarray(gray()), "TIFF"))
    # refused from the header, before any decoding: by our limit, and by Pillow's bomb check further up
    with pytest.raises(ImageError, match="7000x7000 = 49000000 pixels is over the pixel limit"):
        load_image(_png_header_only(7_000, 7_000))
    with pytest.raises(ImageError, match="over the pixel limit"):
        load_image(_png_header_only(20_000, 20_000))
    with pytest.raises(ImageError, match="4096 pixels is over the pixel limit of 1000"):
        load_image(png, max_pixels=1000)
    with pytest.raises(ImageError, match="over the 100-byte limit"):
        load_image(png, max_bytes=100)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        load_image(3)


def test_chat_prompt_puts_each_image_run_where_its_part_was():
    import nanoseek
    from nanoseek.image import chat_prompt
    from nanoseek.model.vision import image_token_count
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["What is in this picture? Compare them."] * 4, vocab_size=300)
    vision = {**VCFG.to_dict(), "max_tiles": 1}
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size, vision_config=vision,
                                                 image_token_id=tok.image_id)
    url = "data:image/png;base64," + base64.b64encode(encode(Image.fromarray(gray()))).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "and"}, {"type": "image", "image": Image.fromarray(gray(seed=1))}]}]
    ids, images = chat_prompt(tok, messages, config)
    n = image_token_count(VisionConfig(**vision))
    assert len(images) == 2 and ids.count(tok.image_id) == 2 * n
    first = ids.index(tok.image_id)
    assert ids[first : first + n] == [tok.image_id] * n and ids[first + n] != tok.image_id
    assert ids[-1] == tok.assistant_id
    second = ids.index(tok.image_id, first + n)
    assert tok.decode(ids[first + n : second]) == "and"  # the text between the two parts
    with pytest.raises(ImageError, match="no vision encoder"):
        chat_prompt(tok, messages, nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size))
    typed = [{"role": "user", "content": [{"type": "text", "text": "<image>"}, {"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(ImageError, match=r"2 <image> mark\(s\) but 1 image"):
        chat_prompt(tok, typed, config)
    text_only = [{"role": "user", "content": "hi"}]
    assert chat_prompt(tok, text_only, config) == (tok.encode_chat(text_only), [])
