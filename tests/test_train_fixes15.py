"""Training fixes, round 15: a real full disk (safetensors' own I/O error) during a checkpoint write is
the one-line error, not a traceback; TensorBoard keeps the checkpoint step's points on resume and a
fresh run hides an earlier killed run's; a window no longer than the MTP depth is refused before any
work (it crashed in the MTP module's attention); fp8 load errors name the tensor; a WSD decay never
reaches back into the warmup."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.train.metrics import MetricsLog
from nanoseek.train.trainer import Settings

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"def cube_{i}(x):\n    return x * x * x - {i}\n\n" for i in range(200))
SMALL = ["--preset", "test", "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1",
         "--log-every", "1", "--eval-every", "0", "--max-new-tokens", "1", "--threads", "1", "--dtype", "fp32",
         "--device", "cpu"]


def test_a_full_disk_under_real_safetensors_is_a_one_line_checkpoint_error(tmp_path):
    """safetensors raises its own SafetensorError (not OSError) when a write fails: the run ended in a
    traceback. A file-size limit makes the weights' write fail for real (EFBIG), while the corpus,
    tokenizer and shards, all far smaller, are written."""
    (tmp_path / "c.txt").write_text(TEXT)
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        from nanoseek.cli import main
        sys.exit(main(["train", "--corpus", {str(tmp_path / "c.txt")!r}, "--out", {str(tmp_path / "run")!r},
                       "--steps", "1", *{SMALL!r}]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("nanoseek train: error: could not write checkpoint") and "File too large" in last, last
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith((".", "step-"))]


@pytest.fixture
def fake_tensorboard(monkeypatch):
    """torch.utils.tensorboard stand-in that records each SummaryWriter's purge_step (tensorboard
    itself is an optional install)."""
    writers = []

    class SummaryWriter:
        def __init__(self, logdir, purge_step=None):
            writers.append(purge_step)

        def add_scalar(self, *args):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    return writers


def test_tensorboard_keeps_the_resumed_checkpoints_step_and_a_fresh_run_hides_a_killed_ones(tmp_path, fake_tensorboard):
    """TensorBoard hides every event at or after purge_step. Resumed at step 4, the first new step
    is 5: purging at 4 lost step 4's points (kept in metrics.jsonl). A fresh run (metrics.jsonl
    started empty) left a killed earlier run's points mixed with its own."""
    MetricsLog(tmp_path, resume_step=4).close()
    MetricsLog(tmp_path).close()
    assert fake_tensorboard == [5, 1]


def test_a_window_no_longer_than_the_mtp_depth_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"--seq-len 2: must be longer than --mtp-depth 2"):
        Settings(steps=1, seq_len=2, mtp_depth=2).validate(mtp_modules=2)
    Settings(steps=1, seq_len=3, mtp_depth=2).validate(mtp_modules=2)
    Settings(steps=1, seq_len=1, mtp_depth=0).validate(mtp_modules=1)  # no MTP loss: nothing ahead to predict
    Settings(steps=1, seq_len=1).validate()  # sft's first check: the depth is capped to the model's afterwards
    args = ["train", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run"), *SMALL]
    assert main([*args, "--steps", "1", "--seq-len", "1"]) == 2  # was a ZeroDivisionError at the first step
    assert "--seq-len 1: must be longer than --mtp-depth 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def saved(tmp_path):
    nanoseek.save(nanoseek.build_model(nanoseek.get_preset("test"), seed=0), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _rewrite(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


KEY = "model.layers.0.self_attn.o_proj.weight"


def test_an_fp8_block_scale_that_does_not_fit_names_the_tensor(saved):
    def edit(t):
        t[KEY], t[KEY + "_scale_inv"] = t[KEY].to(torch.float8_e4m3fn), torch.ones(2, 2)  # (64, 64) has 1x1 blocks
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=rf"{KEY}.*\(2, 2\).*\(64, 64\)"):
        nanoseek.load(saved)


def test_a_misshaped_fp8_tensor_names_key_and_shapes(saved):
    def edit(t):
        t[KEY], t[KEY + "_scale_inv"] = t[KEY][0].to(torch.float8_e4m3fn), torch.ones(1)  # a vector: was a ValueError
    _rewrite(saved, edit)
    with pytest.raises(CheckpointError, match=rf"{KEY}.*\(64,\).*\(64, 64\)"):
        nanoseek.load(saved)


def test_a_wsd_decay_longer_than_the_steps_after_warmup_starts_where_the_warmup_ends():
    """decay_frac 1 (warmup, then a linear decay over the whole run): the warmup climbed to max_lr
    and the next step dropped back to 0.9 of it, the decay having started at step 0."""
    from nanoseek.train.optim import lr_at

    kw = dict(max_lr=1.0, total_steps=100, warmup_steps=10, schedule="wsd", decay_frac=1.0, min_lr_ratio=0.0)
    lrs = [lr_at(step, **kw) for step in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and all(a > b for a, b in zip(lrs[10:], lrs[11:]))  # was 0.9, 0.89, ...
    assert lrs[55] == pytest.approx(0.5)  # halfway through the 90 steps of decay
