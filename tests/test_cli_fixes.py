"""Command-line input the commands must refuse with one line on stderr and exit status 2 (not a
traceback, not a silent fallback), malformed files named in errors, and the benchmarks and README
saying what they do."""

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.checkpoint import CheckpointError
from nanoseek.cli import main
from nanoseek.serve.textgen import load_generator
from nanoseek.tokenizer import Tokenizer, TokenizerError

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "to be, or not to be: that is the question. " * 20]
NOT_UTF8 = "the \udcff"  # what Python's surrogateescape makes of the bytes b"the \xff"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    config = nanoseek.get_preset("test").replace(vocab_size=tokenizer.vocab_size)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    nanoseek.save(nanoseek.build_model(config, seed=0), folder, extra_files=tokenizer.files())
    return folder


def copy_with(checkpoint: Path, folder: Path, name: str, content: bytes) -> Path:
    """A copy of the checkpoint with one file replaced."""
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / name).write_bytes(content)
    return folder


def one_line(err: str, start: str) -> str:
    assert err.startswith(start) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ---- --threads ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "train", "sft", "train-vlm"])
def test_a_negative_threads_is_refused_and_torch_keeps_its_threads(checkpoint, tmp_path, capsys, command):
    before = torch.get_num_threads()
    argv = {"generate": ["generate", str(checkpoint), "--prompt", "the"],
            "train": ["train", "--out", str(tmp_path / "run")],
            "sft": ["sft", "--init", str(checkpoint), "--data", str(tmp_path / "chats.jsonl")],
            "train-vlm": ["train-vlm", "--data", str(tmp_path / "data.npz"), "--out", str(tmp_path / "vlm")]}[command]
    assert main([*argv, "--threads", "-1"]) == 2
    assert "--threads must be at least 0 (0: torch's default), got -1" in one_line(capsys.readouterr().err, f"nanoseek {command}:")
    assert torch.get_num_threads() == before


def test_threads_helps_agree_that_0_is_torchs_default():
    import argparse
    import importlib

    for module in ("nanoseek.inference.cli", "nanoseek.train.pretrain", "nanoseek.train.sft", "nanoseek.train.vlm"):
        parser = argparse.ArgumentParser()
        importlib.import_module(module).add_arguments(parser)
        action = next(a for a in parser._actions if "--threads" in a.option_strings)
        assert action.default == 0 and action.help == "torch CPU threads (0: torch's default)", module


# ---- malformed config.json, tokenizer_config.json, safetensors index --------------------------------
def test_generate_names_the_config_file_and_field_of_a_malformed_config(checkpoint, tmp_path, capsys):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = copy_with(checkpoint, tmp_path / "bad", "config.json", json.dumps({**config, "hidden_size": "big"}).encode())
    assert main(["generate", str(bad), "--prompt", "the"]) == 2
    err = one_line(capsys.readouterr().err, "nanoseek generate:")
    assert str(bad / "config.json") in err and "hidden_size" in err


@pytest.mark.parametrize("command", ["generate", "chat", "params"])
def test_a_config_that_is_not_utf8_is_named(checkpoint, tmp_path, capsys, command):
    bad = copy_with(checkpoint, tmp_path / "bad", "config.json", b"\xff\xfe{}")
    argv = {"generate": ["generate", str(bad), "--prompt", "the"], "chat": ["chat", "--model", str(bad)],
            "params": ["params", str(bad)]}[command]
    assert main(argv) == 2
    assert f"{bad / 'config.json'}: not UTF-8 text" in one_line(capsys.readouterr().err, f"nanoseek {command}:")


def test_loading_names_a_tokenizer_config_or_an_index_that_is_not_utf8(checkpoint, tmp_path):
    bad = copy_with(checkpoint, tmp_path / "tok", "tokenizer_config.json", b"\xff\xfe{}")
    with pytest.raises(TokenizerError, match=re.escape(f"{bad / 'tokenizer_config.json'}: not UTF-8 text")):
        Tokenizer.load(bad)
    bad = copy_with(checkpoint, tmp_path / "index", "model.safetensors.index.json", b"\xff\xfe{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{bad / 'model.safetensors.index.json'}: not UTF-8 text")):
        nanoseek.load(bad)


# ---- prompts that are not UTF-8 -----------------------------------------------------------------------
def test_the_tokenizer_refuses_text_that_is_not_unicode(tokenizer):
    for encode in (lambda: tokenizer.encode(NOT_UTF8, bos=True), lambda: tokenizer.encode_batch(["ok", NOT_UTF8]),
                   lambda: tokenizer.encode_chat([{"role": "user", "content": NOT_UTF8}])):
        with pytest.raises(TokenizerError, match="not valid Unicode"):
            encode()
    with pytest.raises(TypeError):  # not a string at all: still the caller's bug
        tokenizer.encode(None)


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
@pytest.mark.parametrize("chat", [False, True])
def test_generate_refuses_a_prompt_that_is_not_utf8(checkpoint, capsys, monkeypatch, errors, chat):
    flags = ["--max-new-tokens", "2"] + (["--chat"] if chat else [])
    assert main(["generate", str(checkpoint), "--prompt", NOT_UTF8, *flags]) == 2
    assert "not valid Unicode" in one_line(capsys.readouterr().err, "nanoseek generate:")
    # piped: Python's stdin decodes bytes that are not UTF-8 with surrogateescape or refuses them
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"the \xff\n"), encoding="utf-8", errors=errors))
    assert main(["generate", str(checkpoint), *flags]) == 2
    one_line(capsys.readouterr().err, "nanoseek generate:")


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(checkpoint, capsys, monkeypatch, errors):
    script = b"the \xff\nthe quick\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(script), encoding="utf-8", errors=errors))
    assert main(["chat", "--model", str(checkpoint), "--max-tokens", "2", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    if errors == "surrogateescape":
        assert "not valid Unicode" in out and out.count("tokens in,") == 1  # the next line got its reply
    else:  # a strict decoder over a pipe loses the rest of its buffer (a terminal hands over a line at a time)
        assert "not text in the terminal's encoding" in out


# ---- nanoseek serve and chat flags, checked before the model loads -------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be between 0 and 65535, got 70000"),
    (["--port", "-1"], "--port must be between 0 and 65535, got -1"),
    (["--max-queue", "-1"], "--max-queue must be at least 1, got -1"),
    (["--max-queue", "0"], "--max-queue must be at least 1, got 0"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be at least 1, got 0"),
    (["--max-seq-len", "0"], "--max-seq-len must be at least 2, got 0"),
    (["--max-cached-tokens", "0"], "--max-cached-tokens must be at least 2, got 0"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be at least 1, got 0"),
    (["--max-batch-size", "0"], "--max-batch-size must be at least 1, got 0"),
])
def test_serve_refuses_flag_values_it_cannot_run_with_before_loading(tmp_path, capsys, flags, message):
    # no such model: its error would come first if the flags were checked after the load
    assert main(["serve", "--model", str(tmp_path / "missing"), *flags]) == 2
    assert one_line(capsys.readouterr().err, "nanoseek serve:") == f"nanoseek serve: {message}\n"


def test_serve_log_level_is_one_of_uvicorns(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", str(tmp_path / "missing"), "--log-level", "foo"])
    assert exit_.value.code == 2 and "--log-level: invalid choice: 'foo'" in capsys.readouterr().err


def test_a_context_of_0_is_refused_not_taken_for_the_default(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path / "missing"), "--max-seq-len", "0"]) == 2
    assert one_line(capsys.readouterr().err, "nanoseek chat:") == "nanoseek chat: --max-seq-len must be at least 2, got 0\n"
    for kwargs in (dict(max_seq_len=0), dict(max_cached_tokens=0)):  # before the load: no such folder
        with pytest.raises(ValueError, match="must be at least 2"):
            load_generator(tmp_path / "missing", **kwargs)


# ---- nanoseek params, demo, tokenizer ------------------------------------------------------------------
def test_params_reports_a_bad_model_in_one_line_with_status_2(checkpoint, tmp_path, capsys):
    config = json.loads((checkpoint / "config.json").read_text())
    bad = copy_with(checkpoint, tmp_path / "bad", "config.json", json.dumps({**config, "hidden_size": "big"}).encode())
    assert main(["params", str(bad)]) == 2
    err = one_line(capsys.readouterr().err, "nanoseek params:")
    assert str(bad / "config.json") in err and "hidden_size" in err
    assert main(["params", str(tmp_path / "nothing")]) == 2
    assert "is neither a preset" in one_line(capsys.readouterr().err, "nanoseek params:")
    assert main(["params", str(checkpoint)]) == 0


def test_demo_takes_device_and_refuses_fewer_than_one_token(capsys):
    assert main(["demo", "--preset", "test", "--tokens", "1", "--device", "cpu"]) == 0
    assert re.search(r"greedy continuation \[\d+\] \(\d+ tokens/s", capsys.readouterr().out)
    for tokens in ("0", "-3"):
        assert main(["demo", "--preset", "test", "--tokens", tokens]) == 2
        assert one_line(capsys.readouterr().err, "nanoseek demo:") == f"nanoseek demo: --tokens must be at least 1, got {tokens}\n"
    assert main(["demo", "--preset", "test", "--device", "tpu"]) == 2
    assert "tpu" in one_line(capsys.readouterr().err, "nanoseek demo: --device")


def test_tokenizer_reports_an_out_it_cannot_write(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(TEXT))
    (tmp_path / "file").write_text("")
    assert main(["tokenizer", str(corpus), "--out", str(tmp_path / "file" / "tok"), "--vocab-size", "300"]) == 2
    assert "cannot write to" in one_line(capsys.readouterr().err, "nanoseek tokenizer: error:")


# ---- benchmarks and README -----------------------------------------------------------------------------
def load_benchmark(name: str, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # benchmarks/train.py sets it: undone after the test
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Reached(Exception):
    pass


def raise_reached(*args, **kwargs):
    raise Reached


@pytest.mark.parametrize("name", ["train", "decode", "serve"])
def test_benchmarks_tune_the_allocator_as_the_command_does(name, monkeypatch):
    module = load_benchmark(name, monkeypatch)
    monkeypatch.setattr(module, "tune_allocator", raise_reached)
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    with pytest.raises(Reached):
        module.main()


def test_decode_benchmark_header_names_bf16_when_it_runs(monkeypatch, capsys):
    module = load_benchmark("decode", monkeypatch)
    monkeypatch.setattr(module, "decode_rate", raise_reached)  # stop after the header
    for flags, dtypes in (([], ", fp32\n"), (["--bf16"], ", fp32 and nanoseek in bf16\n")):
        monkeypatch.setattr(sys, "argv", ["decode.py", "--preset", "test", "--threads", "1", "--no-transformers", *flags])
        with pytest.raises(Reached):
            module.main()
        header = capsys.readouterr().out.splitlines()[0] + "\n"
        assert header.startswith("# decode benchmark:") and header.endswith(dtypes), header


def test_serve_benchmark_compile_help_says_how_it_compiles(monkeypatch, capsys):
    module = load_benchmark("serve", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["serve.py", "--help"])
    with pytest.raises(SystemExit):
        module.main()
    help_text = " ".join(capsys.readouterr().out.split())
    assert "ahead of time (torch.export + AOTInductor" in help_text and "torch.compile the decode step" not in help_text


def test_readme_states_the_forward_bound_as_the_benchmark_computes_it():
    readme = " ".join((ROOT / "README.md").read_text().split())
    forward = (ROOT / "benchmarks" / "forward.py").read_text()
    assert 'counts["activated"] - counts["parts"]["embeddings"]' in forward
    assert "bound = 2 x activated matmul parameters (the activated parameters less the input embedding" in readme


def test_serve_log_level_takes_any_case_as_uvicorn_does(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing"), "--log-level", "INFO"]) == 2  # past the flags
    assert "invalid choice" not in capsys.readouterr().err


def test_a_config_json_with_a_bad_field_is_named_with_its_path(tmp_path):
    """from_json names the file for every error, field errors included (train --config, params)."""
    from nanoseek.config import ConfigError, ModelConfig

    raw = nanoseek.get_preset("test").to_dict()
    raw["scoring_func"] = "config.json"  # a value that holds the file's name must not hide the path
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"^{path}: config field 'scoring_func'"):
        ModelConfig.from_json(path)
