"""Test-wide settings: compiled decode steps are cached in a folder of this test session, not in
the user's ~/.cache (a stale or foreign cache must not decide a test; builds are shared between
tests and the servers they start, which inherit the environment); the `one_thread` fixture."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

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
