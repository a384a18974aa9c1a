"""Process-wide CPU settings: the allocator tuning that the CLI applies and library users may call."""

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_is_opt_in_and_idempotent():
    # a fresh interpreter: this test process may already have applied it through the CLI's code
    code = ("import nanoseek, nanoseek.runtime as r; before = r._applied; "
            "print(before, nanoseek.tune_allocator(), nanoseek.tune_allocator())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"  # importing nanoseek leaves the process's allocator alone
    assert out[1:] == ["True", "True"]
