"""Training checkpoint fixes: a run resumed from an earlier checkpoint sets the abandoned branch's
later ones aside, a `latest` that became a folder (a run copied without symlinks), a checkpoint write that
fails (a full disk) as a one-line error, --vocab-size that is not --tokenizer's size refused, and
--tokenizer-max-bytes part of the data folder's reuse check."""

import argparse
import errno
import json
import os
import shutil

import pytest

import nanoseek
import nanoseek.checkpoint
import nanoseek.train.checkpoint
from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import pretrain
from nanoseek.train.checkpoint import branch_from, list_checkpoints, read_state, resolve_resume, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"def cube_{i}(x):\n    return x * x * x - {i}\n\n" for i in range(200))
SMALL = ["--preset", "test", "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1",
         "--log-every", "1", "--eval-every", "0", "--max-new-tokens", "1", "--threads", "1", "--dtype", "fp32",
         "--device", "cpu"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return nanoseek.build_model(nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size), seed=0)


def steps(run):
    return [read_state(p)["step"] for p in list_checkpoints(run)]


def test_a_run_resumed_from_an_earlier_checkpoint_sets_the_abandoned_later_ones_aside(model, tok, tmp_path):
    run = tmp_path / "run"
    for step in (2, 4, 6):
        save_checkpoint(run, model, tok, {"step": step, "branch": "old"}, {}, keep=3)
    assert branch_from(run / "step-000002") == [run / "step-000004", run / "step-000006"]  # resumed from step 2
    assert os.readlink(run / "latest") == "step-000002" and resolve_resume(run) == run / "step-000002"
    save_checkpoint(run, model, tok, {"step": 3, "branch": "new"}, {}, keep=2)
    save_checkpoint(run, model, tok, {"step": 4, "branch": "new"}, {}, keep=2)
    assert steps(run) == [3, 4]  # was [4, 6]: the old branch's step 6 outlived the new branch's saves
    assert read_state(run / "step-000004")["branch"] == "new" and resolve_resume(run) == run / "step-000004"
    # set aside, never deleted: also the old step 4, which the new branch's step 4 would have replaced
    assert [read_state(run / f"abandoned-step-00000{n}")["branch"] for n in (4, 6)] == ["old", "old"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    assert branch_from(run / "step-000004") == []  # resuming from the newest is no branch


def test_a_checkpoint_overwrites_a_folder_of_its_name_and_a_leftover_swap(model, tok, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, model, tok, {"step": 3, "branch": "old"}, {}, keep=0)
    leftover = run / f".step-000003.old-{os.getpid()}"  # a killed process with this pid left it
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    save_checkpoint(run, model, tok, {"step": 3, "branch": "new"}, {}, keep=0)  # was OSError: directory not empty
    assert read_state(resolve_resume(run))["branch"] == "new"
    assert not leftover.exists()


def test_latest_as_a_real_folder_is_replaced_and_the_copied_run_resumes(model, tok, tmp_path):
    save_checkpoint(tmp_path / "run", model, tok, {"step": 1}, {})
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, symlinks=False)
    assert (copy / "latest").is_dir() and not (copy / "latest").is_symlink()
    assert resolve_resume(copy) == copy / "step-000001"
    save_checkpoint(copy, model, tok, {"step": 2}, {})  # was IsADirectoryError at os.replace
    assert os.readlink(copy / "latest") == "step-000002"
    assert not [p for p in copy.iterdir() if p.name.startswith(".")]


def full_disk_after(monkeypatch, calls: int):
    """safetensors writes fail with ENOSPC after `calls` successful ones, leaving a file cut short."""
    real, done = nanoseek.checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        if len(done) >= calls:
            open(filename, "wb").write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        done.append(filename)
        return real(tensors, filename, metadata=metadata)
    monkeypatch.setattr(nanoseek.checkpoint, "save_file", save_file)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_cleans_up(model, tok, tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, model, tok, {"step": 1}, {})
    full_disk_after(monkeypatch, 0)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-000002: \[Errno 28\] No space"):
        save_checkpoint(run, model, tok, {"step": 2}, {})
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000001"]
    assert resolve_resume(run / "latest") == run / "step-000001"
    monkeypatch.undo()

    def sha256(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(nanoseek.train.checkpoint, "_sha256", sha256)  # after the weights, making the manifest
    with pytest.raises(CheckpointError, match="No space"):
        save_checkpoint(run, model, tok, {"step": 2}, {})
    assert sorted(p.name for p in run.iterdir()) == ["latest", "step-000001"]  # was: .step-000002.partial left


def test_train_ends_a_failed_save_with_a_one_line_error(tmp_path, monkeypatch, capsys):
    (tmp_path / "c.txt").write_text(TEXT)
    full_disk_after(monkeypatch, 1)  # step 1 is saved, step 2 is not
    assert main(["train", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "run"), *SMALL, "--steps", "2",
                 "--save-every", "1"]) == 2  # was an OSError traceback
    err = capsys.readouterr().err
    assert "nanoseek train: error: could not write checkpoint" in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error" in line] == [err.strip().splitlines()[-1]]
    assert steps(tmp_path / "run") == [1]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


def parse_train(*argv):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(["--preset", "test", *argv])


def test_a_vocab_size_that_is_not_the_tokenizers_is_refused(tok, tmp_path, capsys):
    tok.save(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"--vocab-size 512: the tokenizer .* has 300 tokens"):
        pretrain.base_config(parse_train("--tokenizer", str(tmp_path / "tok"), "--vocab-size", "512"))
    with pytest.raises(ConfigError, match=r"--set vocab_size=512: the tokenizer .* has 300 tokens"):
        pretrain.base_config(parse_train("--tokenizer", str(tmp_path / "tok"), "--set", "vocab_size=512"))
    pretrain.base_config(parse_train("--tokenizer", str(tmp_path / "tok"), "--vocab-size", "300"))  # its own size
    pretrain.base_config(parse_train("--tokenizer", str(tmp_path / "tok")))
    (tmp_path / "c.txt").write_text(TEXT)
    flags = [flag if flag != "300" else "512" for flag in SMALL]
    assert main(["train", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "run"), *flags, "--steps", "1",
                 "--tokenizer", str(tmp_path / "tok")]) == 2  # was: trained a 300-token model, 512 ignored
    assert "--vocab-size 512: the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_changed_tokenizer_byte_budget_retrains_the_tokenizer(tok, tmp_path, capsys):
    (tmp_path / "c.txt").write_text(TEXT)

    def prepare(*flags):
        capsys.readouterr()
        pretrain.prepare_data(parse_train("--corpus", str(tmp_path / "c.txt"), *flags), tmp_path / "run", 300)
        return capsys.readouterr().out

    assert "trained a 300-token" in prepare("--tokenizer-max-bytes", "1000")
    assert "trained a" not in prepare("--tokenizer-max-bytes", "1000")  # the same settings: reused
    assert "trained a 300-token" in prepare("--tokenizer-max-bytes", "2000")  # was: the old tokenizer reused
    assert json.loads((tmp_path / "run" / "data" / "meta.json").read_text())["tokenizer_max_bytes"] == 2000
    Tokenizer.train([TEXT.replace("cube", "sum")], vocab_size=300).save(tmp_path / "tok")
    prepare("--tokenizer", str(tmp_path / "tok"), "--tokenizer-max-bytes", "2000")
    # was: reused, the --tokenizer one taken for a trained tokenizer of the same size
    assert "trained a 300-token" in prepare("--tokenizer-max-bytes", "2000")


@pytest.mark.parametrize("command", ["train", "sft"])
def test_an_out_folder_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys, command):
    (tmp_path / "c.txt").write_text(TEXT)
    (tmp_path / "a-file").write_text("")
    out = str(tmp_path / "a-file" / "run")  # its parent is a file: NotADirectoryError
    if command == "train":
        argv = ["train", "--corpus", str(tmp_path / "c.txt"), "--out", out, *SMALL, "--steps", "1"]
    else:
        base = tmp_path / "base"
        nanoseek.save(nanoseek.build_model(nanoseek.get_preset("test"), seed=0), base, extra_files=Tokenizer.train(
            [TEXT], 300).files())
        (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "yo"}]}) + "\n")
        argv = ["sft", "--init", str(base), "--data", str(tmp_path / "chat.jsonl"), "--out", out, "--steps", "1"]
    assert main(argv) == 2  # was a traceback
    err = capsys.readouterr().err
    assert f"nanoseek {command}: error:" in err and "a-file" in err and "Traceback" not in err


def test_nanoseek_debug_shows_the_traceback_instead(tmp_path, monkeypatch):
    (tmp_path / "c.txt").write_text(TEXT)
    monkeypatch.setenv("NANOSEEK_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        main(["train", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "c.txt" / "run"), *SMALL])


@pytest.mark.parametrize("flags, named", [(["--seq-len", "600"], "--seq-len 600: longer than the model's context"),
                                          (["--temperature", "-1"], "--temperature -1.0: must be a number >= 0")])
def test_a_window_past_the_context_or_a_negative_temperature_is_refused_before_any_work(tmp_path, capsys, flags, named):
    (tmp_path / "c.txt").write_text(TEXT)
    argv = ["train", "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path / "run"), *SMALL, "--steps", "1",
            "--set", "max_position_embeddings=512", *flags]
    assert main(argv) == 2  # trained past the context, or sampled greedily, without a word
    assert named in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()


def test_a_tokenizer_from_an_empty_corpus_is_refused(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["tokenizer", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "tok")]) == 2  # was a 264-token one
    assert "no text to train the tokenizer on" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_sft_fits_its_default_window_to_a_shorter_context_and_refuses_an_explicit_one(tmp_path, capsys):
    base = tmp_path / "base"
    config = nanoseek.get_preset("test").replace(max_position_embeddings=128)
    nanoseek.save(nanoseek.build_model(config, seed=0), base, extra_files=Tokenizer.train([TEXT], 300).files())
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "yo"}]}) + "\n" for i in range(4)))
    argv = ["sft", "--init", str(base), "--data", str(tmp_path / "chat.jsonl"), "--steps", "1", "--batch-size", "2",
            "--dtype", "fp32", "--device", "cpu", "--threads", "1"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0  # the default 512 was refused against 128
    assert main([*argv, "--out", str(tmp_path / "b"), "--seq-len", "256"]) == 2
    assert "--seq-len 256: longer than the model's context" in capsys.readouterr().err
