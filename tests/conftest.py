"""Test-wide settings: compiled decode steps are cached in a folder of this test session, not in
the user's ~/.cache (a stale or foreign cache must not decide a test; builds are shared between
tests and the servers they start, which inherit the environment)."""

import atexit
import os
import shutil
import tempfile

_cache = tempfile.mkdtemp(prefix="nanoseek-test-cache-")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ["NANOSEEK_CACHE"] = _cache
