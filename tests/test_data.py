"""Data: shards are deterministic, the split holds documents apart, the loader is seeded and resumable."""

import json
import os

import numpy as np
import pytest

from nanoseek.data import DataError, PackedLoader, TokenStream, iter_documents, prepare_shards, val_batches
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"def f{i}(x):\n    return x * {i}  # ünïcode {i}\n" * (i + 3))
    (root / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.py").write_text("skipped")
    return root


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train((t for _, t in iter_documents(corpus)), vocab_size=320)


def test_shards_are_deterministic(corpus, tok, tmp_path):
    a = prepare_shards(corpus, tok, tmp_path / "a", val_fraction=0.2, shard_tokens=1000)
    b = prepare_shards(corpus, tok, tmp_path / "b", val_fraction=0.2, shard_tokens=1000)
    assert a == b and len(a["splits"]["train"]["files"]) > 1  # several shards
    for split in ("train", "val"):
        for name in a["splits"][split]["files"]:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val = TokenStream(tmp_path / "a", "train"), TokenStream(tmp_path / "a", "val")
    assert train.dtype == np.uint16 and len(train) == sum(a["splits"]["train"]["tokens"])
    # every document is <bos> text <eos>, and the split holds whole documents apart
    assert a["splits"]["train"]["documents"] + a["splits"]["val"]["documents"] == 40
    assert train.read(0, 1)[0] == tok.bos_id and train.read(len(train) - 1, 1)[0] == tok.eos_id
    text = tok.decode(train.read(0, len(train)).tolist()) + tok.decode(val.read(0, len(val)).tolist())
    assert "skipped" not in text and "binary" not in text
    assert sorted(text.count(f"def f{i}(x)") for i in range(40)) == sorted(i + 3 for i in range(40))


def test_single_text_file_splits_at_a_line(tmp_path, tok):
    lines = [f"line {i} of the play\n" for i in range(200)]
    (tmp_path / "play.txt").write_text("".join(lines))
    meta = prepare_shards(tmp_path / "play.txt", tok, tmp_path / "s", val_fraction=0.1)
    val_text = tok.decode(TokenStream(tmp_path / "s", "val").read(0, meta["splits"]["val"]["tokens"][0]).tolist(), skip_special_tokens=True)
    assert val_text == "".join(lines[180:])


def test_jsonl_and_errors(tmp_path, tok):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(30)) + "\n")
    assert [t for _, t in iter_documents(tmp_path / "c.jsonl")][:2] == ["doc 0", "doc 1"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_documents(tmp_path / "missing"))


def test_loader_order_is_seeded_and_resumes_exactly(corpus, tok, tmp_path):
    prepare_shards(corpus, tok, tmp_path / "s", val_fraction=0.2, shard_tokens=700)
    stream = TokenStream(tmp_path / "s", "train")
    a, b = PackedLoader(stream, 4, 32, seed=1), PackedLoader(stream, 4, 32, seed=1)
    batches = []
    while a.epoch < 2 or len(batches) < 10:  # into the third epoch
        batches.append(a.next_batch())
    for x, y in batches[:5]:
        bx, by = b.next_batch()
        assert x.equal(bx) and y.equal(by) and x[:, 1:].equal(y[:, :-1])
    state = b.state_dict()
    c = PackedLoader(stream, 4, 32, seed=1)
    c.load_state_dict(json.loads(json.dumps(state)))
    for x, _ in batches[5:]:
        assert c.next_batch()[0].equal(x)
    other = PackedLoader(stream, 4, 32, seed=2).next_batch()[0]
    assert not other.equal(batches[0][0])
    assert len(val_batches(TokenStream(tmp_path / "s", "val"), 4, 32, max_batches=2)) <= 2


def test_truncated_shard_is_refused(corpus, tok, tmp_path):
    meta = prepare_shards(corpus, tok, tmp_path / "s", val_fraction=0.2)
    shard = tmp_path / "s" / meta["splits"]["train"]["files"][0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        TokenStream(tmp_path / "s", "train")


def test_corpus_fingerprint_follows_the_corpus(tmp_path):
    from nanoseek.data import corpus_fingerprint

    (tmp_path / "a.py").write_text("x = 1\n")
    before = corpus_fingerprint(tmp_path)
    assert corpus_fingerprint(tmp_path) == before
    (tmp_path / "b.py").write_text("y = 2\n")
    assert corpus_fingerprint(tmp_path) != before


def test_invalid_utf8_is_named_with_its_line(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "hello \xff world"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: not UTF-8"):
        list(iter_documents(tmp_path / "c.jsonl"))
    (tmp_path / "c.txt").write_bytes(b"one\ntwo\nth\xffree\n")
    with pytest.raises(DataError, match=r"c\.txt:3: not UTF-8 text \(byte offset 10"):
        list(iter_documents(tmp_path / "c.txt"))


def test_tokenizer_command_names_the_bad_utf8_line(tmp_path, capsys):
    from nanoseek.cli import main

    (tmp_path / "c.jsonl").write_bytes(b'{"text": "hello \xff world"}\n')
    assert main(["tokenizer", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]) == 2
    assert "c.jsonl:1: not UTF-8" in capsys.readouterr().err


def test_corpus_fingerprint_sees_an_edit_of_the_same_length(tmp_path):
    from nanoseek.data import corpus_fingerprint

    for corpus in (tmp_path / "folder" / "a.py", tmp_path / "c.txt", tmp_path / "c.jsonl"):
        corpus.parent.mkdir(exist_ok=True)
        corpus.write_text('{"text": "x = 1"}\n' if corpus.suffix == ".jsonl" else "x = 1\n")
        stat = corpus.stat()
        target = corpus.parent if corpus.parent.name == "folder" else corpus
        before = corpus_fingerprint(target)
        corpus.write_text(corpus.read_text().replace("1", "2"))
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # as `cp -p` or a checkout may leave it
        assert corpus_fingerprint(target) != before, corpus


def test_tokenizer_without_bos_eos_is_refused_for_shards(corpus, tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    from nanoseek.tokenizer import TokenizerError

    backend = RustTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["plain text only"], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    plain = Tokenizer(backend)
    assert plain.bos_id is None and plain.eos_id is None
    with pytest.raises(TokenizerError, match="no <｜begin▁of▁sentence｜> or <｜end▁of▁sentence｜> token"):
        prepare_shards(corpus, plain, tmp_path / "s")
    assert not (tmp_path / "s").exists() and not list(tmp_path.iterdir())


def test_shard_folder_follows_the_umask(corpus, tok, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        meta = prepare_shards(corpus, tok, tmp_path / "s", val_fraction=0.2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o755
    for name in [*meta["splits"]["train"]["files"], "meta.json"]:
        assert stat.S_IMODE((tmp_path / "s" / name).stat().st_mode) == 0o644, name
