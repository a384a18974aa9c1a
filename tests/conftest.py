"""Test-wide settings: compiled decode steps are cached in a folder of this test session, not in
the user's ~/.cache (a stale or foreign cache must not decide a test; builds are shared between
tests and the servers they start, which inherit the environment); the `one_thread` fixture; `vlm`,
a tiny vision-language model and its tokenizer."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

import nanoseek
from nanoseek.tokenizer import Tokenizer

_cache = tempfile.mkdtemp(prefix="nanoseek-test-cache-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ["NANOSEEK_CACHE"] = _cache


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and a shared machine makes two threads erratic.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vlm():
    """(model, tokenizer): the `test` preset with a 16-pixel vision tower tiled up to 4 tiles, random weights."""
    tok = Tokenizer.train(["What does this image show? A bright square on a dark ground."] * 8, vocab_size=300)
    vision = dict(image_size=16, patch_size=4, patch_overlap=2, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, max_tiles=4)
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size, vision_config=vision,
                                                 image_token_id=tok.image_id, eos_token_id=tok.eos_id)
    return nanoseek.build_model(config, seed=0).eval(), tok
