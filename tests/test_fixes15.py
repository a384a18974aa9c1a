"""Fixes from the review of the tokenizer, data, image, text and sampling code (round 15)."""

import base64
import io
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from nanoseek.data import (DataError, PackedLoader, TokenStream, iter_documents, jsonl_lines, prepare_shards,
                           split_documents)
from nanoseek.image import ImageError, load_image
from nanoseek.inference.sampling import SamplingBatch, SamplingParams, process_logits
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["def f(x):\n    return x * 2  # ünïcode\n" * 40, "hello world, hello there\n" * 40], 300)


# ---- data ----------------------------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_split_not_crashed(tmp_path, tok):
    # Linux file names are bytes: Python hands one that is not UTF-8 back with surrogate escapes
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    with open(os.fsencode(tmp_path) + b"/caf\xe9.txt", "w") as f:
        f.write("def f(x):\n    return x\n" * 20)
    train, val = split_documents(iter_documents(tmp_path), 0.5)
    assert len(train) + len(val) == 2
    meta = prepare_shards(tmp_path, tok, tmp_path.parent / "shards-nonutf8")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 2


def test_a_text_of_few_long_lines_keeps_its_val_fraction(tmp_path):
    (tmp_path / "one.txt").write_text("header\n" + "x" * 1000)  # the only line break is near the start
    (train,), (val,) = split_documents(iter_documents(tmp_path / "one.txt"), 0.05)
    assert train + val == "header\n" + "x" * 1000
    assert 25 <= len(val) <= 80  # was all but "header\n": val took 99% of the text
    # a line break near the cut is still where it cuts
    text = "".join(f"line {i:03d}\n" for i in range(100))
    (train,), (val,) = split_documents([("t.txt", text)], 0.05)
    assert train.endswith("\n") and train + val == text and 4 * 9 <= len(val) <= 7 * 9


def test_prepare_shards_refuses_to_replace_a_folder_that_is_not_shards(tmp_path, tok):
    corpus = tmp_path / "data"  # `nanoseek train data/ --out .` writes its shards to ./data
    corpus.mkdir()
    (corpus / "notes.txt").write_text("hello world\n" * 50)
    with pytest.raises(DataError, match="holds more than shards and a tokenizer"):
        prepare_shards(corpus, tok, corpus)
    assert (corpus / "notes.txt").read_text() == "hello world\n" * 50  # was deleted
    # a shard folder is replaced, and so is an empty folder
    out = tmp_path / "shards"
    prepare_shards(corpus, tok, out)
    prepare_shards(corpus, tok, out)
    (tmp_path / "empty").mkdir()
    prepare_shards(corpus, tok, tmp_path / "empty")
    assert (tmp_path / "empty" / "meta.json").is_file()


def test_a_symlinked_folder_is_read_and_a_symlink_loop_ends(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.txt").write_text("from a linked folder\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a file\n")
    (corpus / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)
    assert dict(iter_documents(corpus)) == {"a.txt": "a file\n", "linked/b.txt": "from a linked folder\n"}


def test_an_upper_case_jsonl_suffix_is_jsonl(tmp_path):
    upper = tmp_path / "DATA.JSONL"
    upper.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert [t for _, t in iter_documents(upper)] == ["one", "two"]  # was one document of raw JSON


def test_a_jsonl_file_with_a_byte_order_mark_is_read(tmp_path):
    bom = tmp_path / "windows.jsonl"
    bom.write_bytes('\ufeff{"text": "one"}\r\n{"text": "two"}\r\n'.encode("utf-8"))
    assert [t for _, t in iter_documents(bom)] == ["one", "two"]  # was "Unexpected UTF-8 BOM"
    assert [json.loads(line) for _, line in jsonl_lines(bom)] == [{"text": "one"}, {"text": "two"}]


def test_an_empty_text_file_is_no_corpus(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="no text documents"):  # was shards of <bos><eos> in both splits
        prepare_shards(tmp_path / "empty.txt", tok, tmp_path / "shards")


@pytest.mark.parametrize("meta", ["[]", "{}", '{"splits": {"train": 3}, "dtype": "uint16", "vocab_size": 3}', b"\xff\xfe"])
def test_a_malformed_meta_json_is_a_data_error(tmp_path, meta):
    (tmp_path / "meta.json").write_bytes(meta if isinstance(meta, bytes) else meta.encode())
    with pytest.raises(DataError, match=r"meta\.json"):
        TokenStream(tmp_path, "train")


def test_a_split_too_short_for_the_loader_says_how_many_tokens_it_needs(tmp_path, tok):
    (tmp_path / "c.txt").write_text("hello world\n" * 40)
    prepare_shards(tmp_path / "c.txt", tok, tmp_path / "shards")
    stream = TokenStream(tmp_path / "shards", "train")
    seq_len = (len(stream) - 1) // 2 + 1  # one window fits, a shifted epoch does not
    with pytest.raises(DataError, match=f"needs at least {2 * seq_len + 1}"):
        PackedLoader(stream, 1, seq_len)


# ---- images --------------------------------------------------------------------------------------
def _png(w=6, h=4):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_png_with_a_corrupt_header_is_an_image_error():
    data = bytearray(_png())
    data[11] = 0x0B  # the IHDR chunk's length: 11 instead of 13 bytes; Pillow raises a bare ValueError
    with pytest.raises(ImageError, match="unreadable image"):
        load_image(bytes(data))


def test_an_unreadable_image_file_is_an_image_error(tmp_path, monkeypatch):
    path = tmp_path / "scan.png"
    path.write_bytes(_png())

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root, who runs some CI
    with pytest.raises(ImageError, match="scan.png: cannot read the image file \\(Permission denied\\)"):
        load_image(str(path))


def test_a_long_missing_path_is_not_called_a_corrupt_base64_image():
    path = "/data/scans/patient-000123/series-0001/image-0001-final-version-two"  # base64's alphabet, no dot
    with pytest.raises(ImageError, match="no such image file"):
        load_image(path)
    # base64 of an image still loads
    assert load_image(base64.b64encode(_png(9, 9)).decode()).size == (9, 9)


# ---- sampling ------------------------------------------------------------------------------------
def test_top_p_keeps_the_smallest_prefix_that_reaches_it():
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_p=0.5, seed=0)])
    kept = process_logits(torch.zeros(1, 1, 4), s, None).isfinite().sum().item()
    assert kept == 2  # two of four equal tokens make 0.5; was 3
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_p=0.75, seed=0)])
    assert process_logits(torch.zeros(1, 1, 4), s, None).isfinite().sum().item() == 3
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_p=0.999, seed=0)])
    assert process_logits(logits, s, None).isfinite().all()
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_p=1e-6, seed=0)])
    assert process_logits(logits, s, None).isfinite().sum().item() == 1


# ---- tokenizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab_size", [10**30, 1 << 28])  # an OverflowError; the process aborted (a 17 GB reservation)
def test_an_absurd_vocab_size_is_a_message_not_a_crash(tmp_path, capsys, vocab_size):
    from nanoseek.cli import main

    (tmp_path / "c.txt").write_text("hello world\n" * 10)
    assert main(["tokenizer", str(tmp_path / "c.txt"), "--out", str(tmp_path / "tok"), "--vocab-size", str(vocab_size)]) == 2
    assert f"vocab_size {vocab_size} must be at most" in capsys.readouterr().err


def test_the_tokenizer_byte_budget_cuts_a_long_document_and_a_smaller_tokenizer_is_reused(tmp_path, capsys):
    from nanoseek.tokenizer import sample_texts
    from nanoseek.train import pretrain
    import argparse

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    text = "".join(f"def cube_{i}(x):\n    return x * x * x - {i}\n\n" for i in range(200))

    assert list(sample_texts(["x" * 1000], 100)) == ["x" * 100]  # was: all 1000 bytes
    assert list(sample_texts(["ab", "\u00e9\u00e9\u00e9"], 5)) == ["ab", "\u00e9"]  # whole characters only
    (tmp_path / "c.txt").write_text(text)

    def prepare():
        capsys.readouterr()
        args = parser.parse_args(["--preset", "test", "--corpus", str(tmp_path / "c.txt"), "--tokenizer-max-bytes", "500"])
        pretrain.prepare_data(args,
                              tmp_path / "run", 4000)
        return capsys.readouterr().out

    assert "trained a 4000-token" in prepare()
    # the corpus makes fewer merges than 4000 tokens: the same request reuses it (was: retrained each time)
    assert "trained a" not in prepare()


def test_the_plot_line_names_the_plot_only_when_one_was_drawn(tmp_path):
    from nanoseek.train.pretrain import plot_line

    assert plot_line(tmp_path).startswith("none (it needs matplotlib")  # was: a path to no file
    (tmp_path / "train_plot.png").write_bytes(b"png")
    assert plot_line(tmp_path) == str(tmp_path / "train_plot.png")


def test_a_folder_of_a_tokenizer_takes_shards_and_a_foreign_meta_json_does_not_make_a_shard_folder(tmp_path, tok):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    # `nanoseek tokenizer c.txt --out run/data`, then `nanoseek train --tokenizer run/data --out run`
    tok.save(tmp_path / "run" / "data")
    prepare_shards(corpus, tok, tmp_path / "run" / "data")  # was refused after the first fix
    assert (tmp_path / "run" / "data" / "meta.json").is_file()
    mine = tmp_path / "mine"  # a user's folder that has a meta.json of its own beside the corpus
    mine.mkdir()
    (mine / "meta.json").write_text('{"name": "my dataset"}')
    (mine / "corpus.txt").write_text("hello world\n" * 50)
    with pytest.raises(DataError, match="holds more than shards"):
        prepare_shards(mine / "corpus.txt", tok, mine)
    assert (mine / "corpus.txt").is_file()  # was deleted


def test_a_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]])
    s = SamplingBatch.from_params([SamplingParams(temperature=1.0, top_p=1e-46, seed=0)])
    kept = process_logits(logits, s, None).isfinite()
    assert kept.tolist() == [[[True, False, False, False]]]  # was: nothing kept, NaN probabilities


def test_base64_of_a_png_with_a_corrupt_header_is_called_an_unreadable_image():
    data = bytearray(_png())
    data[11] = 0x0B
    with pytest.raises(ImageError, match="unreadable image"):  # was "not base64 of an image either"
        load_image(base64.b64encode(bytes(data)).decode())


def test_generate_runs_without_pillow(tmp_path, monkeypatch, capsys):
    import sys

    import nanoseek
    from nanoseek.cli import main

    tok_ = Tokenizer.train(["hello world, a tiny corpus"] * 20, 300)
    nanoseek.save(nanoseek.build_model(nanoseek.get_preset("test").replace(vocab_size=tok_.vocab_size), seed=0),
                  tmp_path / "m", extra_files=tok_.files())
    for name in ("PIL", "PIL.Image", "nanoseek.image"):
        monkeypatch.setitem(sys.modules, name, None)  # as without the `vision` extra
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hello", "--max-new-tokens", "3"]) == 0  # was status 2


def test_a_folder_of_another_tokenizer_is_not_replaced_by_shards(tmp_path, tok):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    other = Tokenizer.train(["something else entirely, with other merges"] * 30, 300)
    other.save(tmp_path / "run" / "data")  # `nanoseek tokenizer ... --out run/data`, then train without --tokenizer
    with pytest.raises(DataError, match="holds more than shards"):
        prepare_shards(corpus, tok, tmp_path / "run" / "data")
    assert Tokenizer.load(tmp_path / "run" / "data").files() == other.files()  # was deleted


def test_text_that_decodes_to_two_bmp_letters_is_not_called_an_image():
    with pytest.raises(ImageError, match="not base64 of an image either"):  # was "unreadable image"
        load_image("Qk0" + "a" * 61)
