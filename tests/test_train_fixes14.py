"""Training-path fixes: bad input named in one line (lone surrogates in a JSONL corpus, a 0 vocabulary
or byte budget, a malformed manifest or tokenizer config), flags a resumed run would ignore, metrics
rows that average the same steps after a resume, SFT's --val-fraction 0, its sample prompt and its
data changed under a resumed run, an all-val document split, metrics rewritten atomically."""

import argparse
import json
import pathlib

import pytest

import nanoseek
from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.data import DataError, PackedLoader, TokenStream, iter_documents, prepare_shards, split_documents, val_batches
from nanoseek.tokenizer import Tokenizer, TokenizerError
from nanoseek.train import pretrain
from nanoseek.train.checkpoint import verify_checkpoint
from nanoseek.train.metrics import MetricsLog, read_metrics
from nanoseek.train.sft import split_conversations
from nanoseek.train.trainer import Settings, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "".join(f"def square_{i}(x):\n    return x * x + {i}\n\n" for i in range(300))
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
SFT_FLAGS = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--device", "cpu",
             "--threads", "1", "--eval-batches", "1"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT, json.dumps(CHAT)], vocab_size=300)


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    (root / "code.txt").write_text(TEXT)
    prepare_shards(root / "code.txt", tok, root / "data", val_fraction=0.1)
    return root / "data"


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A `test`-preset checkpoint with its tokenizer, to fine-tune."""
    path = tmp_path_factory.mktemp("base") / "base"
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    nanoseek.save(nanoseek.build_model(config, seed=0), path, extra_files=tok.files())
    return path


def test_a_lone_surrogate_in_a_jsonl_corpus_is_named_by_line(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": "bad \\ud800 here"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: 'text' holds '\\ud800'"):
        list(iter_documents(corpus))
    assert main(["tokenizer", str(corpus), "--out", str(tmp_path / "tok")]) == 2  # was a UnicodeEncodeError traceback
    assert "c.jsonl:2" in capsys.readouterr().err


def test_documents_that_all_hash_to_val_leave_one_to_train_on():
    train, val = split_documents([("f1.py", "one"), ("f2.py", "two")], 0.5)  # both names hash below 0.5
    assert train == ["one"] and val == ["two"]


def parse_train(*argv):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(["--preset", "test", *argv])


def test_a_vocab_size_or_byte_budget_of_0_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--vocab-size 0"):
        pretrain.base_config(parse_train("--vocab-size", "0"))  # was taken for "not given"
    with pytest.raises(ConfigError, match="--tokenizer-max-bytes 0"):
        pretrain.base_config(parse_train("--tokenizer-max-bytes", "0"))
    (tmp_path / "c.txt").write_text(TEXT)
    assert main(["tokenizer", str(tmp_path / "c.txt"), "--out", str(tmp_path / "tok"), "--max-bytes", "0"]) == 2
    assert "--max-bytes 0" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()  # not a tokenizer without a single merge


@pytest.mark.parametrize("config, match", [
    ({"bos_token": 5}, "bos_token must be a token string"),
    ({"eos_token": {"content": 3}}, "eos_token must be a token string"),
    (["not", "an", "object"], "expected a JSON object"),
])
def test_a_malformed_tokenizer_config_is_named(tok, tmp_path, config, match):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("manifest, match", [
    ([], "expected a JSON object, got list"),
    ({"config.json": 5}, "entry for config.json"),
    ({"config.json": {"size": 1}}, "entry for config.json"),
])
def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path, manifest, match):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=match):
        verify_checkpoint(tmp_path)


@pytest.fixture(scope="module")
def finished_runs(base, tmp_path_factory):
    """The command lines of a finished 2-step `train` run and a finished 2-step `sft` run."""
    root = tmp_path_factory.mktemp("finished")
    (root / "code.txt").write_text(TEXT)
    (root / "chats.jsonl").write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(4)))
    train = ["train", "--corpus", str(root / "code.txt"), "--out", str(root / "train"), "--preset", "test",
             "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--warmup-steps", "1", "--eval-every", "0",
             "--max-new-tokens", "1", "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--threads", "1"]
    sft = ["sft", "--init", str(base), "--data", str(root / "chats.jsonl"), "--out", str(root / "sft"), *SFT_FLAGS]
    assert main(train) == 0 and main(sft) == 0
    return {"train": train, "sft": sft}


def out_of(argv):
    return argv[argv.index("--out") + 1]


@pytest.mark.parametrize("command, flags, named", [
    ("train", ["--steps", "40", "--lr", "1"], "--steps, --lr"),
    ("train", ["--corpus", "other.txt"], "--corpus"),
    ("sft", ["--data", "other.jsonl"], "--data"),
    ("sft", ["--steps", "5"], "--steps"),
])
def test_resume_refuses_flags_it_would_ignore(finished_runs, capsys, command, flags, named):
    run = out_of(finished_runs[command])
    capsys.readouterr()
    assert main([command, "--resume", run, *flags]) == 2  # they were silently ignored
    err = capsys.readouterr().err
    assert f"{named}: a resumed run keeps the settings" in err and len(err.strip().splitlines()) == 1
    applying = {"train": ["--prompt", "x", "--max-new-tokens", "1", "--temperature", "0"], "sft": []}[command]
    assert main([command, "--resume", run, "--threads", "1", "--device", "cpu", *applying]) == 0


@pytest.mark.parametrize("command", ["train", "sft"])
def test_resume_takes_the_first_command_again(finished_runs, capsys, command):
    """The flags a run was started with, repeated with --resume added, are the run's own settings."""
    argv = finished_runs[command]
    assert main([*argv, "--resume", out_of(argv)]) == 0, capsys.readouterr().err


def test_metrics_rows_after_a_resume_average_the_same_steps(tok, shards, tmp_path):
    def trainer(run):
        settings = Settings(batch_size=2, seq_len=32, steps=4, warmup_steps=2, log_every=4, save_every=2, keep=0,
                            eval_every=0, dtype="fp32")
        loader = PackedLoader(TokenStream(shards, "train"), 2, 32, seed=0)
        val = val_batches(TokenStream(shards, "val"), 2, 32, 1)
        config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
        return Trainer(nanoseek.build_model(config, seed=0), settings, tok, loader, val, run)

    trainer(tmp_path / "a").fit()
    resumed = trainer(tmp_path / "b")
    resumed.load(tmp_path / "a" / "step-000002")  # killed after step 2's checkpoint
    resumed.fit(resumed=True)
    (a,), (b,) = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    for key in ("loss", "loss_avg", "mtp_loss", "expert_load", "load_max_over_mean"):
        assert a[key] == b[key], key  # loss_avg, mtp_loss and the loads averaged steps 3-4 only


def test_metrics_are_rewritten_atomically_on_resume(tmp_path, monkeypatch):
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(rows)

    def disk_full(self, data, *args, **kwargs):
        open(self, "w").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError):
        MetricsLog(tmp_path, resume_step=2)
    assert (tmp_path / "metrics.jsonl").read_text() == rows  # was emptied


def conversation(i):
    return {"messages": [{"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": f"it is {i}"}]}


def test_sft_val_fraction_0_holds_out_nothing():
    conversations = [(i, conversation(i)["messages"]) for i in range(5)]
    train, val = split_conversations(conversations, 0.0)
    assert len(train) == 5 and val == []  # one was held out all the same


def test_sft_ends_well_when_the_held_out_conversation_has_only_replies(base, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps(CHAT) + "\n" + json.dumps({"messages": [{"role": "assistant", "content": "only me"}]}) + "\n")
    _, val = split_conversations([(1, CHAT["messages"]), (2, [{"role": "assistant", "content": "only me"}])], 0.05)
    assert val[0][0] == 2
    assert main(["sft", "--init", str(base), "--data", str(data), "--out", str(tmp_path / "sft"), *SFT_FLAGS]) == 0
    assert "error" not in capsys.readouterr().err  # the sample prompt after training was an empty chat


def test_sft_resume_refuses_data_that_changed(base, tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(conversation(i)) + "\n" for i in range(4)))
    out = tmp_path / "sft"
    assert main(["sft", "--init", str(base), "--data", str(data), "--out", str(out), *SFT_FLAGS, "--save-every", "1"]) == 0
    (out / "step-000002").rename(out / "gone")  # as if killed after step 1's checkpoint
    (out / "latest").unlink()
    with open(data, "a") as f:
        f.write(json.dumps(conversation(9)) + "\n")
    capsys.readouterr()
    assert main(["sft", "--resume", str(out), "--threads", "1", "--device", "cpu"]) == 2
    assert "has changed since this run started" in capsys.readouterr().err
