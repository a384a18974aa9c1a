"""Test-wide settings: compiled decode steps are cached in a folder of this test session, not in
the user's ~/.cache (a stale or foreign cache must not decide a test; builds are shared between
tests and the servers they start, which inherit the environment); the `one_thread` fixture; `vlm`,
a tiny vision-language model and its tokenizer; `tiny_served_model`, a saved tiny model with a tokenizer."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_served_model(tmp_path_factory):
    """A folder holding the `test` preset (random weights, a 512-token context) and a 400-token
    tokenizer trained on some of nanoseek's own source: what the server and the engine process load."""
    folder = tmp_path_factory.mktemp("served") / "tiny"
    source = [p.read_text() for p in sorted(Path(nanoseek.__file__).parent.rglob("*.py"))][:20]
    tok = Tokenizer.train(source, 400)
    config = nanoseek.get_preset("test").replace(vocab_size=400, max_position_embeddings=512)
    nanoseek.save(nanoseek.build_model(config, seed=3), folder, extra_files=tok.files())
    return folder
