"""Fixes from the review of the vision path against DeepSeek-VL2: base64 image data without its
'=' padding is read, as browsers read data URLs (it was refused as 'Incorrect padding')."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from nanoseek.image import ImageError, decode_data_url, load_image


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(width * height, dtype=np.uint8).reshape(height, width)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data", [b"\x89PNG\xfb\xff", b"\x89PNG\xfb\xff\x00", b"\x89PNG\xfb\xff\x00\x01"])
def test_base64_without_padding_is_read_as_browsers_do(data):
    padded = base64.b64encode(data).decode()  # ends in '==', '=' and nothing; holds '+' and '/'
    urlsafe = base64.urlsafe_b64encode(data).decode()  # '-' and '_' instead
    for payload in (padded, padded.rstrip("="), urlsafe, urlsafe.rstrip("=")):
        assert decode_data_url("data:image/png;base64," + payload) == data  # unpadded was refused


def test_an_unpadded_image_loads():
    png = _png(5, 3)
    payload = base64.b64encode(png).decode()
    assert payload.endswith("=")
    assert load_image("data:image/png;base64," + payload.rstrip("=")).size == (5, 3)


def test_base64_that_is_broken_beyond_padding_is_still_refused():
    payload = base64.b64encode(_png(5, 3)).decode().rstrip("=")
    assert len(payload) % 4 == 3
    for bad in (payload + "AA", payload[:-1] + "@", payload + "==="):  # 4k+1 characters, a non-base64 character, excess '='
        with pytest.raises(ImageError, match="invalid base64"):
            decode_data_url("data:image/png;base64," + bad)
