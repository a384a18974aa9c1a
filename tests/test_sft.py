"""SFT: only assistant tokens are targets; a short fine-tune from a checkpoint learns the replies."""

import argparse
import json

import pytest

import nanoseek
from nanoseek.tokenizer import EOS, Tokenizer
from nanoseek.train import sft
from nanoseek.train.trainer import IGNORE

CHATS = [
    {"messages": [{"role": "system", "content": "You add numbers."},
                  {"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(12) for b in range(12)
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    text = [json.dumps(c) for c in CHATS]
    return Tokenizer.train(text, vocab_size=300)


def test_only_assistant_tokens_are_targets(tok):
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "Hi."},
                {"role": "user", "content": "Again, in German."},
                {"role": "assistant", "content": "Hallo."}]
    [(inputs, targets)] = sft.encode_examples(tok, [messages], seq_len=256)
    assert inputs[0] == tok.bos_id and len(inputs) == len(targets)
    trained = targets[targets != IGNORE].tolist()
    assert tok.decode(trained) == "Hi." + EOS + "Hallo." + EOS
    # the targets sit where those tokens come next in the conversation
    kept = targets != IGNORE
    assert (targets[:-1][kept[:-1]] == inputs[1:][kept[:-1]]).all()
    batch_inputs, batch_targets = sft.collate([(inputs, targets), (inputs[:5], targets[:5])], tok.pad_id)
    assert batch_inputs[1, 5:].eq(tok.pad_id).all() and batch_targets[1, 5:].eq(IGNORE).all()


def test_truncated_reply_and_bad_lines(tok, tmp_path):
    long_user = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]
    assert sft.encode_examples(tok, [long_user], seq_len=16) == []  # the reply was cut off: nothing to learn
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(sft.SFTDataError, match="bad.jsonl:1: no assistant"):
        sft.read_conversations(tmp_path / "bad.jsonl")


def test_sft_command_fine_tunes_a_checkpoint(tok, tmp_path):
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    nanoseek.save(nanoseek.build_model(config, seed=0), tmp_path / "base", extra_files=tok.files())
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)
    args = parser.parse_args(["--init", str(tmp_path / "base"), "--data", str(tmp_path / "chats.jsonl"), "--out",
                              str(tmp_path / "sft"), "--steps", "30", "--batch-size", "8", "--seq-len", "64",
                              "--lr", "3e-3", "--warmup-steps", "3", "--dtype", "fp32", "--eval-every", "30", "--log-every", "1"])
    assert sft.run(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0
    assert rows[-1]["val_loss"] < losses[0]
    assert nanoseek.load(tmp_path / "sft" / "latest").config.vocab_size == tok.vocab_size


GOOD = json.dumps(CHATS[0]) + "\n"


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("sft-base") / "base"
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    nanoseek.save(nanoseek.build_model(config, seed=0), path, extra_files=tok.files())
    return path


def sft_main(base, data, out, *extra):
    from nanoseek.cli import main

    return main(["sft", "--init", str(base), "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2",
                 "--seq-len", "64", "--threads", "1", "--dtype", "fp32", "--device", "cpu", *extra])


@pytest.mark.parametrize("content, message", [
    (GOOD + '{"messages": 5}\n', "chats.jsonl:2: \"messages\" must be a list"),
    (GOOD + '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]}\n',
     "chats.jsonl:2: message 1: 'content' must be"),
    (GOOD + "\n" + '{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
     "chats.jsonl:3: message 0"),
    (GOOD.encode() + b'{"messages": [{"role": "user", "content": "h\xffi"}]}\n', "chats.jsonl:2: not UTF-8 text"),
    (None, "missing.jsonl: cannot read the chat data"),
])
def test_bad_chat_data_is_a_one_line_error_naming_the_line(base, tmp_path, capsys, content, message):
    data = tmp_path / ("missing.jsonl" if content is None else "chats.jsonl")
    if content is not None:
        (data.write_bytes if isinstance(content, bytes) else data.write_text)(content)
    assert sft_main(base, data, tmp_path / "sft") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_nothing_to_train_on_is_explained(base, tmp_path, capsys):
    long_prompt = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "ok"}]}
    (tmp_path / "long.jsonl").write_text((json.dumps(long_prompt) + "\n") * 3)
    assert sft_main(base, tmp_path / "long.jsonl", tmp_path / "a", "--seq-len", "16") == 2
    assert "no training conversation has an assistant token within its first --seq-len 16" in capsys.readouterr().err
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS[:6]))
    assert sft_main(base, tmp_path / "chats.jsonl", tmp_path / "b", "--val-fraction", "0.9999") == 2
    assert "--val-fraction 0.9999 holds out all 6 conversations" in capsys.readouterr().err
    assert sft_main(base, tmp_path / "chats.jsonl", tmp_path / "c", "--val-fraction", "1") == 2
    assert "--val-fraction 1.0: must be at least 0 and below 1" in capsys.readouterr().err


def test_minutes_sets_the_length_unless_steps_is_given():
    parser = argparse.ArgumentParser()
    sft.add_arguments(parser)

    def settings(*flags):
        return sft.settings_from_args(parser.parse_args(list(flags)), default_steps=sft.DEFAULT_STEPS)

    assert (settings().steps, settings().minutes) == (200, None)
    assert (settings("--minutes", "3").steps, settings("--minutes", "3").minutes) == (None, 3.0)
    assert (settings("--steps", "7", "--minutes", "3").steps, settings("--steps", "7", "--minutes", "3").minutes) == (7, None)
