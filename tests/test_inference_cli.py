"""`nanoseek generate` end to end on a saved random model with a freshly trained tokenizer, and the text helpers."""

import importlib
import io

import pytest

import nanoseek
from nanoseek.cli import main
from nanoseek.inference.cli import unescape
from nanoseek.inference.text import StopStrings
from nanoseek.tokenizer import Tokenizer

generate_module = importlib.import_module("nanoseek.inference.generate")  # the package exports a function of that name
TEXT = ["the quick brown fox jumps over the lazy dog. " * 20, "to be, or not to be: that is the question. " * 20]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = Tokenizer.train(TEXT, vocab_size=300)
    config = nanoseek.get_preset("test").replace(vocab_size=tokenizer.vocab_size)
    model = nanoseek.build_model(config, seed=0)
    folder = tmp_path_factory.mktemp("ckpt") / "model"
    nanoseek.save(model, folder, extra_files=tokenizer.files())
    return folder, model, tokenizer


def test_generate_command_prints_the_greedy_continuation(checkpoint, capsys):
    folder, model, tokenizer = checkpoint
    prompt = "to be, or not"
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos", "--stats"]) == 0
    out, err = capsys.readouterr()
    ids = tokenizer.encode(prompt, bos=True)
    expected = nanoseek.generate(model, [ids], 12, stop_token_ids=[])[0]
    assert out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"
    assert "tokens/s" in err and "CPU ms/token" in err
    # speculative decoding prints the same text, and its figures
    assert main(["generate", str(folder), "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos",
                 "--speculative", "--stats"]) == 0
    spec_out, spec_err = capsys.readouterr()
    assert spec_out == out and "tokens per main-model forward" in spec_err


def test_generate_command_stops_at_a_stop_string_streamed_and_batched(checkpoint, capsys):
    """The text printed ends where a stop string begins, and the stop string is never printed."""
    folder, model, tokenizer = checkpoint
    prompt = "to be, or not"
    full = tokenizer.decode(nanoseek.generate(model, [tokenizer.encode(prompt, bos=True)], 24, stop_token_ids=[])[0],
                            skip_special_tokens=True)
    stop = full[len(full) // 2 :][:3]
    assert len(stop) == 3 and stop.strip()
    flags = ["--max-new-tokens", "24", "--ignore-eos", "--stop", stop]
    assert main(["generate", str(folder), "--prompt", prompt, *flags]) == 0
    assert capsys.readouterr().out == full[: full.index(stop)] + "\n"
    assert main(["generate", str(folder), "--prompt", prompt, "--prompt", prompt, *flags]) == 0
    assert capsys.readouterr().out == f"--- 0\n{full[: full.index(stop)]}\n--- 1\n{full[: full.index(stop)]}\n"


def test_generate_command_batch_stop_strings_and_errors(checkpoint, capsys):
    folder, model, tokenizer = checkpoint
    assert main(["generate", str(folder), "--prompt", "the quick", "--prompt", "to be", "--max-new-tokens", "6",
                 "--temperature", "0.9", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 0\n") and "\n--- 1\n" in out
    assert main(["generate", str(folder / "missing")]) == 2
    assert "nanoseek generate:" in capsys.readouterr().err
    assert main(["generate", str(folder), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_generate_command_speculative_stats_when_no_decode_step_runs(checkpoint, capsys):
    """One new token comes from the prefill alone: no draft was made, so no speculation figures."""
    folder, _, _ = checkpoint
    assert main(["generate", str(folder), "--prompt", "to be", "--max-new-tokens", "1", "--ignore-eos",
                 "--speculative", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "1 tokens in" in err and "draft" not in err


@pytest.mark.parametrize("count", ["0", "-5"])
def test_generate_command_refuses_a_max_new_tokens_below_1(checkpoint, capsys, count):
    folder, _, _ = checkpoint
    assert main(["generate", str(folder), "--prompt", "to be", "--max-new-tokens", count]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanoseek generate: --max-new-tokens must be at least 1") and err.count("\n") == 1


def test_stop_escapes_become_characters_and_other_text_is_kept():
    """The shell passes --stop "\\n\\n" as backslashes and n's; non-ASCII text survives (unicode_escape would garble it)."""
    assert unescape(r"\n\n") == "\n\n"
    assert unescape(r"東京\t🚀 Où\r\n") == "東京\t🚀 Où\r\n"
    assert unescape(r"a\\n") == "a\\n" and unescape(r"\x41 \u00e9") == r"\x41 \u00e9"


def test_generate_command_shares_the_cache_length_and_seeds_each_prompt(checkpoint, capsys, monkeypatch):
    """As nanoseek.generate: the cache is rounded up (one compiled step for similar runs, whatever
    the prompt's length) and prompt i gets seed + i."""
    folder, model, tokenizer = checkpoint
    lengths = []

    class Recording(generate_module.Engine):
        def __init__(self, *args, **kwargs):
            lengths.append(kwargs["max_seq_len"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate_module, "Engine", Recording)
    prompt = "to be, or not"
    for text in ("to", prompt):
        assert main(["generate", str(folder), "--prompt", text, "--max-new-tokens", "3"]) == 0
    assert lengths == [256, 256]
    capsys.readouterr()
    flags = ["--max-new-tokens", "8", "--ignore-eos", "--temperature", "1", "--seed", "3"]
    assert main(["generate", str(folder), "--prompt", prompt, "--prompt", prompt, *flags]) == 0
    ids = tokenizer.encode(prompt, bos=True)
    first, second = [tokenizer.decode(t, skip_special_tokens=True)
                     for t in nanoseek.generate(model, [ids, ids], 8, temperature=1.0, seed=3, stop_token_ids=[])]
    assert first != second
    assert capsys.readouterr().out == f"--- 0\n{first}\n--- 1\n{second}\n"


def test_a_piped_prompt_loses_the_newline_echo_adds(checkpoint, capsys, monkeypatch):
    folder, model, tokenizer = checkpoint
    flags = ["--max-new-tokens", "8", "--ignore-eos"]
    expected = nanoseek.generate(model, [tokenizer.encode("to be, or not", bos=True)], 8, stop_token_ids=[])[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("to be, or not\n"))
    assert main(["generate", str(folder), *flags]) == 0
    assert capsys.readouterr().out == tokenizer.decode(expected, skip_special_tokens=True) + "\n"


def test_stop_strings():
    tokenizer = Tokenizer.train(TEXT, vocab_size=300)
    ids = tokenizer.encode("to be, or not to be: that is the question.")
    stop = StopStrings(tokenizer.decode, ["that is"])
    hits = [stop(ids[: i + 1]) for i in range(len(ids))]
    first = hits.index(True)
    assert "that is" in tokenizer.decode(ids[: first + 1]) and "that is" not in tokenizer.decode(ids[:first])
    assert stop.truncate("to be: that is all") == "to be: "
    with pytest.raises(ValueError, match="non-empty"):
        StopStrings(tokenizer.decode, [""])
