"""Data: shards are deterministic, the split holds documents apart, the loader is seeded and resumable."""

import json

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
