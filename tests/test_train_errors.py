"""Bad command lines of `nanoseek train` / `nanoseek sft`: one-line errors with exit status 2,
before any data work; --set values; resuming a run with the wrong command or from a new place."""

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
from nanoseek.cli import main
from nanoseek.train import pretrain
from nanoseek.train.checkpoint import check_resumable_by
from nanoseek.checkpoint import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"def cube_{i}(x):\n    return x * x * x - {i}\n\n" for i in range(300))
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
SMALL = ["--batch-size", "2", "--seq-len", "32", "--threads", "1", "--dtype", "fp32",
         "--eval-batches", "2", "--device", "cpu"]


def train(corpus, out, *extra):
    return main(["train", "--corpus", str(corpus), "--out", str(out), "--preset", "test", *SMALL, "--max-new-tokens", "1",
                 "--prompt", "x", *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors") / "code.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def run(corpus):
    """A two-step pretraining run whose vocabulary and tied head were given with --set."""
    out = corpus.parent / "run"
    assert train(corpus, out, "--steps", "2", "--set", "vocab_size=300", "--set", "tie_word_embeddings=False") == 0
    return out


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "linear"], "--schedule 'linear': must be one of cosine, wsd"),
    (["--dtype", "fp16"], "--dtype 'fp16'"),
    (["--mtp-depth", "5"], "--mtp-depth 5: the model has 1 MTP module"),
    (["--log-every", "0"], "--log-every 0"),
    (["--seq-len", "0"], "--seq-len 0"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--eval-batches", "0"], "--eval-batches 0"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--steps", "0"], "--steps 0"),
    (["--minutes", "-1"], "--minutes -1.0"),
    (["--lr", "nan"], "--lr nan"),
    (["--set", "bos_token_id=5"], "--set bos_token_id: the special token ids are the tokenizer's"),
    (["--set", "no_such_field=1"], "expected FIELD=VALUE with a ModelConfig field"),
    (["--set", "hidden_size=-4"], "hidden_size"),
    (["--vocab-size", "300", "--set", "vocab_size=400"], "disagree"),
    (["--vocab-size", "100"], "--vocab-size 100: a byte-level BPE"),
    (["--set", "vocab_size=100"], "--vocab-size 100: a byte-level BPE"),
    (["--val-fraction", "1.5"], "--val-fraction 1.5"),
])
def test_train_refuses_bad_settings_before_any_work(corpus, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert train(corpus, out, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("nanoseek train: error:") and err.count("\n") == 1
    assert not out.exists()  # no tokenizer trained, no shards written


@pytest.mark.parametrize("flags, message", [
    (["--schedule", "linear"], "--schedule 'linear'"),
    (["--log-every", "0"], "--log-every 0"),
    (["--grad-accum", "0"], "--grad-accum 0"),
    (["--val-fraction", "1"], "--val-fraction 1.0"),
])
def test_sft_refuses_bad_settings_before_any_work(tmp_path, capsys, flags, message):
    # neither --init nor --data exists: the settings are checked first
    assert main(["sft", "--init", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "sft"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_set_values_are_parsed():
    for text, value in [("False", False), ("true", True), ("None", None), ("null", None), ("3", 3), ("0.5", 0.5),
                        ('{"type": "yarn", "factor": 4}', {"type": "yarn", "factor": 4}), ("sigmoid", "sigmoid")]:
        assert pretrain.parse_set_value(text) == value, text
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    args = parser.parse_args(["--preset", "test", "--set", "tie_word_embeddings=False", "--set", "q_lora_rank=None"])
    config = pretrain.base_config(args)
    assert config.tie_word_embeddings is False and config.q_lora_rank is None


def test_set_vocab_size_sizes_the_tokenizer(run):
    config = json.loads((run / "latest" / "config.json").read_text())
    assert config["vocab_size"] == 300 and config["tie_word_embeddings"] is False
    assert nanoseek.load(run / "latest").config.vocab_size == 300


def test_resume_with_the_other_command_names_the_writer(run, tmp_path, capsys):
    (tmp_path / "chats.jsonl").write_text(json.dumps(CHAT) + "\n" + json.dumps(CHAT | {"id": 1}) + "\n")
    assert main(["sft", "--init", str(run / "latest"), "--data", str(tmp_path / "chats.jsonl"), "--out",
                 str(tmp_path / "sft"), *SMALL, "--steps", "1", "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "sft")]) == 2
    assert "is a `nanoseek sft` run" in capsys.readouterr().err
    assert main(["sft", "--resume", str(run)]) == 2
    assert "is a `nanoseek train` run" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="lacks data_dir"):
        check_resumable_by("train", {"step": 3, "corpus": "x"}, "somewhere")


def test_moved_run_resumes(corpus, tmp_path):
    first = tmp_path / "first"
    assert train(corpus, first, "--steps", "4", "--save-every", "2", "--vocab-size", "300") == 0
    state = json.loads((first / "latest" / "trainer_state.json").read_text())
    assert state["data_dir"] == "data"  # relative to the run folder
    uninterrupted = load_file(first / "step-000004" / "model.safetensors")
    moved = tmp_path / "moved"
    first.rename(moved)
    shutil.rmtree(moved / "step-000004")
    (moved / "latest").unlink()
    assert main(["train", "--resume", str(moved), "--threads", "1", "--device", "cpu"]) == 0
    resumed = load_file(moved / "step-000004" / "model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)  # resumed exactly, data included


def test_old_absolute_data_dir_falls_back_to_the_runs_own(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    assert pretrain.resumed_data_dir("/gone/run/data", run) == run / "data"
    assert pretrain.resumed_data_dir(str(tmp_path), run) == tmp_path  # still there: kept
    assert pretrain.resumed_data_dir("data", run) == run / "data"
