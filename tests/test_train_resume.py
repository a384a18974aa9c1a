"""Exact resume after SIGKILL, and damaged checkpoints refused while the previous one stays usable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import nanoseek
from nanoseek.checkpoint import CheckpointError
from nanoseek.train.checkpoint import list_checkpoints, resolve_resume, verify_checkpoint

TEXT = "".join(f"for i in range({i}):\n    total += i * {i % 7}\n" for i in range(300))
STEPS, SAVE = 40, 20


def train_command(corpus, out, *extra):
    return [sys.executable, "-m", "nanoseek.cli", "train", "--corpus", str(corpus), "--out", str(out), "--preset", "test",
            "--vocab-size", "300", "--steps", str(STEPS), "--save-every", str(SAVE), "--log-every", "1",
            "--eval-every", "0", "--batch-size", "4", "--seq-len", "32", "--warmup-steps", "3", "--max-new-tokens", "2",
            "--threads", "1", "--dtype", "fp32", "--device", "cpu", *extra]  # bitwise: a CPU promise


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "loops.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    subprocess.run(train_command(corpus, out), check=True, capture_output=True, timeout=300)
    return out


def test_resume_after_sigkill_matches_uninterrupted_run(corpus, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_command(corpus, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / f"step-{SAVE:06d}" / "manifest.json"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run never wrote its first checkpoint"
    assert [p.name for p in list_checkpoints(out)] == [f"step-{SAVE:06d}"], "killed too late: the run had finished"
    subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--resume", str(out), "--threads", "1",
                    "--device", "cpu"], check=True,
                   capture_output=True, timeout=300)
    expected, got = losses(uninterrupted), losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit for bit, every step
    assert [p.name for p in list_checkpoints(out)] == [f"step-{SAVE:06d}", f"step-{STEPS:06d}"]


def test_damaged_checkpoint_is_refused_and_previous_stays_usable(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run, symlinks=True)
    newest, previous = list_checkpoints(run)[-1], list_checkpoints(run)[-2]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(newest)
    with pytest.raises(CheckpointError):
        nanoseek.load(newest)
    with pytest.raises(CheckpointError, match="truncated"):
        resolve_resume(newest)  # named explicitly: refused
    with pytest.warns(UserWarning, match="refusing checkpoint"):
        assert resolve_resume(run) == previous  # a run folder: the newest intact one
    verify_checkpoint(previous)
    nanoseek.load(previous)

    state = previous / "training_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        verify_checkpoint(previous)
    result = subprocess.run([sys.executable, "-m", "nanoseek.cli", "train", "--resume", str(previous)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_fresh_run_refuses_a_folder_with_checkpoints(corpus, uninterrupted):
    result = subprocess.run(train_command(corpus, uninterrupted), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr and "--resume" in result.stderr
