"""Corpus -> memory-mapped token shards with a train/val split, and a seeded packing loader.

A corpus is a folder of text or code files (read recursively, in sorted order, binary files
skipped), a JSONL file with a `text` field per line, any other text file, or `stdlib`: the Python
standard library's own sources without its test suites (found with sysconfig; about 12 MB of
Python on every machine).

    meta = prepare_shards("stdlib", tokenizer, "runs/stdlib/data")   # writes train-*.bin, val-*.bin, meta.json
    train = TokenStream("runs/stdlib/data", "train")                  # memory-mapped, all shards as one array
    loader = PackedLoader(train, batch_size=8, seq_len=256, seed=0)
    inputs_BT, targets_BT = loader.next_batch()                      # int64, targets = inputs shifted by one
    state = loader.state_dict()                                      # saved in checkpoints; load_state_dict resumes

Each document becomes `<bos> text <eos>` and documents are concatenated. Documents go to val by a
hash of their name (a stable split that does not move when files are added); a corpus of one
document (a .txt) is split near its last val_fraction, at a line boundary when one is close. Shards are
written to a temporary folder and renamed, and the same corpus and tokenizer give byte-identical
shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sysconfig
import tempfile
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .tokenizer import Tokenizer, TokenizerError, lone_surrogates

META = "meta.json"
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
TEST_DIRS = {"test", "tests", "idle_test"}


class DataError(ValueError):
    """A corpus or a shard folder is missing, empty or unreadable; says which."""


# ---- reading a corpus ---------------------------------------------------------------------------
def resolve_corpus(corpus: str | os.PathLike) -> Path:
    if str(corpus) == "stdlib":
        return Path(sysconfig.get_paths()["stdlib"])
    path = Path(corpus)
    if not path.exists():
        raise DataError(f"corpus {corpus} does not exist (a folder, a .txt, a .jsonl, or 'stdlib')")
    return path


def read_text(path: Path) -> str:
    """The file as UTF-8 text; DataError naming the file (and line) when it is unreadable, binary or
    not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read corpus {path}: {e.strerror or e}") from e
    if b"\0" in raw[:8192]:
        raise DataError(f"{path} is a binary file, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte offset {e.start}: {e.reason})") from e


def jsonl_lines(path: str | os.PathLike, error: type[Exception] = DataError,
                what: str = "corpus") -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSONL file, decoded one line at a time so that
    a line that is not UTF-8 is named; unreadable files and such lines raise `error`. The corpus,
    SFT's chats and train-vlm's pairs all read their JSONL through this."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}:{lineno}: not UTF-8 text (byte {e.start} of the line: {e.reason})") from e
            if lineno == 1:  # a UTF-8 byte order mark, as Windows tools write: not part of the JSON
                line = line.removeprefix("\ufeff")
            if line.strip():
                yield lineno, line


def iter_documents(corpus: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """(name, text) for every document of the corpus, in a fixed order."""
    path = resolve_corpus(corpus)
    if path.is_dir():
        files = []
        seen = {os.path.realpath(path)}  # folders taken: a symlink back up would loop forever
        for root, dirs, names in os.walk(path, followlinks=True):  # symlinked folders are corpus too
            kept = []
            for d in sorted(dirs):
                real = os.path.realpath(os.path.join(root, d))
                if d not in SKIP_DIRS and not d.startswith(".") and real not in seen:
                    seen.add(real)
                    kept.append(d)
            dirs[:] = kept
            files += [Path(root) / n for n in names if not n.startswith(".")]
        if str(corpus) == "stdlib":  # the library's own code: no data files, and no test suites (60% of
            # the bytes, mostly repetitive assertions that would crowd out everything else)
            files = [f for f in files if f.suffix == ".py" and not TEST_DIRS & set(f.relative_to(path).parts[:-1])]
        for file in sorted(files, key=lambda f: f.relative_to(path).as_posix()):
            try:
                text = read_text(file)
            except DataError:  # a folder of sources also holds images, archives, other encodings
                continue
            if text:
                yield file.relative_to(path).as_posix(), text
    elif path.suffix.lower() == ".jsonl":
        for lineno, line in jsonl_lines(path):
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from e
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: 'text' must be a string")
            if (bad := lone_surrogates(text)) is not None:  # JSON can escape one ("\ud800")
                raise DataError(f"{path}:{lineno}: 'text' holds {bad!r}, a lone surrogate escape that is not Unicode text")
            yield f"{path.name}:{lineno}", text
    elif text := read_text(path):  # an empty file is no document, as in a folder
        yield path.name, text


def corpus_fingerprint(corpus: str | os.PathLike) -> str:
    """sha256 over the names and contents of the corpus's documents: changes when the corpus does.

    The contents, not sizes and mtimes: an edit that keeps the length (a typo fixed) must not reuse
    stale shards, `cp -p` or a checkout can restore an old mtime, and every document is read anyway,
    so hashing costs little more (12 MB of stdlib: 0.13 s to read, 0.01 s to hash)."""
    digest = hashlib.sha256()
    for name, text in iter_documents(corpus):
        data = text.encode("utf-8", "surrogatepass")
        digest.update(f"{name}\0{len(data)}\0".encode("utf-8", "surrogatepass"))
        digest.update(data)
    return digest.hexdigest()


def split_documents(documents: Iterable[tuple[str, str]], val_fraction: float) -> tuple[list[str], list[str]]:
    """Texts for train and val. Many documents: by a hash of the name; one: at a line boundary."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    docs = list(documents)
    if not docs:
        raise DataError("the corpus has no text documents")
    if len(docs) == 1:
        text = docs[0][1]
        target = int(len(text) * (1 - val_fraction))
        # a line boundary at most half val's size away (before the target, else after), else the
        # target itself: a text of few long lines must not hand val nearly everything
        slack = (len(text) - target) // 2
        cut = (text.rfind("\n", max(0, target - slack), target) + 1
               or text.find("\n", target, min(target + slack, len(text) - 1)) + 1 or target)
        return [text[:cut]], [text[cut:]]
    train, val = [], []
    for name, text in docs:
        (val if zlib.crc32(name.encode("utf-8", "surrogateescape")) % 10_000 < val_fraction * 10_000 else train).append(text)
    if not val:  # a handful of documents whose hashes all missed: hold out the last one
        val.append(train.pop())
    if not train:  # or all hit (a large val_fraction): train on the first one
        train.append(val.pop(0))
    return train, val


# ---- writing shards -----------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_shards(
    corpus: str | os.PathLike,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    batch_docs: int = 256,
    extra_meta: dict | None = None,
) -> dict:
    """Tokenize the corpus into out_dir/{train,val}-NNNNN.bin + meta.json; returns the metadata.
    extra_meta is recorded in meta.json too (how the caller made the tokenizer, say)."""
    out_dir = Path(os.path.abspath(out_dir))  # "." has no name to make a temporary sibling from
    if out_dir.exists() and not _replaceable(out_dir, tokenizer):
        # it is replaced as a whole: never delete what is not shards (the corpus itself, say)
        raise DataError(f"{out_dir} exists and holds more than shards and a tokenizer: refusing to replace it; "
                        "choose another folder for the shards")
    missing = [token for token, i in ((tokenizer.bos_token, tokenizer.bos_id), (tokenizer.eos_token, tokenizer.eos_id))
               if i is None]
    if missing:  # every document is framed as <bos> text <eos>
        raise TokenizerError(f"the tokenizer has no {' or '.join(missing)} token in its vocabulary, "
                             "which shards need around every document")
    train_texts, val_texts = split_documents(iter_documents(corpus), val_fraction)
    dtype = token_dtype(tokenizer.vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        splits = {}
        for split, texts in (("train", train_texts), ("val", val_texts)):
            writer = _ShardWriter(tmp, split, dtype, shard_tokens)
            for i in range(0, len(texts), batch_docs):
                for ids in tokenizer.encode_batch(texts[i : i + batch_docs]):
                    writer.write([tokenizer.bos_id, *ids, tokenizer.eos_id])
            splits[split] = writer.close()
            splits[split]["documents"] = len(texts)
        meta = {
            "corpus": str(resolve_corpus(corpus)),
            "corpus_fingerprint": corpus_fingerprint(corpus),
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
            "val_fraction": val_fraction,
            "splits": splits,
            **(extra_meta or {}),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        apply_umask(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def process_umask() -> int:
    try:  # Linux reports it without changing it; setting it to read it back races other threads
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700) and its files the modes a plain mkdir and open would
    have, so that what is renamed into place is as readable as the rest of the user's files."""
    mask = process_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.files()["tokenizer.json"].encode()).hexdigest()


class _ShardWriter:
    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.counts: list[int] = []
        self.handle = None

    def write(self, ids: list[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        while len(array):
            if self.handle is None or self.counts[-1] >= self.shard_tokens:
                self._open()
            take = self.shard_tokens - self.counts[-1]
            self.handle.write(array[:take].tobytes())
            self.counts[-1] += len(array[:take])
            array = array[take:]

    def _open(self) -> None:
        if self.handle is not None:
            self.handle.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self.counts.append(0)
        self.handle = open(self.folder / name, "wb")

    def close(self) -> dict:
        if self.handle is not None:
            self.handle.close()
        return {"files": self.files, "tokens": self.counts}


# ---- reading shards -----------------------------------------------------------------------------
# what prepare_shards and Tokenizer.save write: a folder of nothing else may be replaced
_SHARD_FOLDER_FILE = re.compile(r"(meta\.json|tokenizer(_config)?\.json|(train|val)-\d+\.bin)")


def _replaceable(folder: Path, tokenizer: Tokenizer) -> bool:
    """A folder of shards (and the tokenizer saved beside them), a folder holding just the tokenizer
    that is being written (given with --tokenizer), or an empty one. A tokenizer folder of another
    tokenizer, without shards, is someone's work: it stays."""
    if not folder.is_dir() or not all(entry.is_file() and _SHARD_FOLDER_FILE.fullmatch(entry.name)
                                      for entry in folder.iterdir()):
        return False
    saved = folder / "tokenizer.json"
    if (folder / META).is_file() or not saved.is_file():
        return True
    try:
        return saved.read_text(encoding="utf-8") == tokenizer.files()["tokenizer.json"]
    except (OSError, UnicodeDecodeError):
        return False


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / META
    if not path.exists():
        raise DataError(f"{folder} has no {META}: not a shard folder (run prepare_shards first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


class TokenStream:
    """All shards of one split as a single read-only token array (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike, split: str):
        folder = Path(folder)
        meta = read_meta(folder)
        try:
            splits, self.dtype, self.vocab_size = meta["splits"], np.dtype(meta["dtype"]), int(meta["vocab_size"])
            have = {name: list(zip(info["files"], info["tokens"])) for name, info in splits.items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a meta.json of something else
            raise DataError(f"{folder / META}: not the metadata of a shard folder ({type(e).__name__}: {e})") from e
        if split not in have:
            raise DataError(f"{folder}: no split {split!r} (have {', '.join(have)})")
        files = have[split]
        self.shards = []
        for name, count in files:
            file = folder / name
            if not file.exists() or file.stat().st_size != count * self.dtype.itemsize:
                raise DataError(f"shard {file} is missing or not {count} tokens long (truncated?)")
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """tokens[start : start + length] as int64, across shard boundaries."""
        pieces, pos, end = [], start, start + length
        while pos < end:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[i])
            take = min(end - pos, len(self.shards[i]) - local)
            pieces.append(self.shards[i][local : local + take])
            pos += take
        return np.concatenate(pieces).astype(np.int64)


class PackedLoader:
    """Batches of seq_len+1-token windows cut from the stream, in a seeded order, resumable.

    Epoch e starts at a random offset below seq_len and visits its windows in a random
    permutation, both drawn from (seed, e); the position is (epoch, windows consumed), so a
    resumed loader continues exactly where the saved one stopped.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, seed: int = 0):
        if len(stream) < seq_len * 2 + 1:
            raise DataError(f"the split has {len(stream)} tokens, too few for windows of {seq_len + 1}: "
                            f"a shifted epoch needs at least {seq_len * 2 + 1} (a smaller --seq-len, or more text)")
        self.stream, self.batch_size, self.seq_len, self.seed = stream, batch_size, seq_len, seed
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order, self._offset = -1, None, 0

    def _epoch_order(self) -> None:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._offset = int(rng.integers(0, self.seq_len)) if self.epoch else 0
            n = (len(self.stream) - 1 - self._offset) // self.seq_len
            self._order, self._order_epoch = rng.permutation(n), self.epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            self._epoch_order()
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._epoch_order()
            start = self._offset + int(self._order[self.index]) * self.seq_len
            rows.append(self.stream.read(start, self.seq_len + 1))
            self.index += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "index": self.index, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise DataError(f"the saved loader has {key}={state[key]}, this one {getattr(self, key)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def val_batches(stream: TokenStream, batch_size: int, seq_len: int, max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches: windows spread evenly over the whole split, so the loss
    speaks for all of it rather than for its first few documents."""
    available = (len(stream) - 1) // seq_len
    n_windows = min(available, batch_size * max_batches)
    if n_windows < 1:
        raise DataError(f"the val split has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    last_start = len(stream) - 1 - seq_len
    starts = [round(i * last_start / max(1, n_windows - 1)) for i in range(n_windows)]
    rows = [stream.read(start, seq_len + 1) for start in starts]
    batches = []
    for i in range(0, n_windows, batch_size):
        batch = torch.from_numpy(np.stack(rows[i : i + batch_size]))
        batches.append((batch[:, :-1], batch[:, 1:]))
    return batches
