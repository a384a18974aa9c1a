"""Byte-level BPE tokenizer with DeepSeek's special tokens and chat template; `nanoseek tokenizer`.

Trained with the `tokenizers` library (Rust BPE; we only choose the pre-tokenizer and the special
tokens). Saved as `tokenizer.json` + `tokenizer_config.json` (with a Jinja chat template), so
`transformers.AutoTokenizer.from_pretrained(folder)` loads it; a released DeepSeek `tokenizer.json`
folder loads here too.

    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.load("runs/stdlib/latest")            # a checkpoint folder or a tokenizer.json
    ids = tok.encode("def f(x):", bos=True)               # list[int]
    text = tok.decode(ids, skip_special_tokens=True)
    prompt_ids = tok.encode_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids, mask = tok.encode_chat_for_training(messages)   # mask[i]: ids[i] is an assistant token (SFT)
    tok.bos_id, tok.eos_id, tok.pad_id, tok.user_id, tok.assistant_id, tok.think_id, tok.think_end_id, tok.image_id
    nanoseek.save(model, "out/", extra_files=tok.files())

The chat format is DeepSeek-V3's: `<｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}
<｜end▁of▁sentence｜>...`, and a prompt for a reply ends with `<｜Assistant｜>`. Message content is a
string or OpenAI content parts: `{"type": "text", "text": ...}`, and `{"type": "image_url", ...}` /
`{"type": "image", ...}`, each of which becomes one `<image>` token (the vision code expands it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _RustTokenizer

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK, THINK_END = "<think>", "</think>"
IMAGE = "<image>"
# Order fixes the ids of a trained tokenizer: bos 0 and eos 1, as ModelConfig's defaults expect.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, THINK_END, IMAGE)
# the 256 byte tokens and the special tokens, plus at least one merge
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1
# far above any real vocabulary (DeepSeek-V3: 129280); the Rust trainer reserves memory in proportion
# to vocab_size and aborts the whole process when that fails (2**28: 17 GB), past 2**64 it overflows
MAX_VOCAB_SIZE = 1 << 24

# DeepSeek-V3's pre-tokenization: digits in runs of at most 3, CJK runs apart, then a GPT-4-like
# split of words, punctuation and whitespace (indentation stays one piece, handy for code).
_SPLITS = (
    r"\p{N}{1,3}",
    r"[一-龥\u3040-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)

# The same format as `render_chat`, for transformers' apply_chat_template (kept equivalent by a test).
CHAT_TEMPLATE = (
    "{%- macro content(m) -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- else -%}" + IMAGE + "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(system='', first=true) -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- if ns.first -%}{%- set ns.system = content(m) -%}{%- set ns.first = false -%}"
    "{%- else -%}{%- set ns.system = ns.system + '\\n\\n' + content(m) -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{ '" + USER + "' }}{{ content(m) }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '" + ASSISTANT + "' }}{{ content(m) }}{{ eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}"
)

ROLES = ("system", "user", "assistant")


class TokenizerError(ValueError):
    """A tokenizer file is missing or unreadable, or chat messages are malformed; says which."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of DeepSeek's special tokens and the chat format."""

    def __init__(self, backend: _RustTokenizer, config: dict | None = None):
        self.backend = backend
        config = config or {}

        def token_name(key: str, default: str) -> str:
            value = config.get(key, default)
            name = value.get("content", default) if isinstance(value, dict) else (value or default)
            if not isinstance(name, str):  # the vocabulary lookup would fail with a bare TypeError
                raise TokenizerError(f"{key} must be a token string, got {name!r:.80}")
            return name

        self.bos_token, self.eos_token = token_name("bos_token", BOS), token_name("eos_token", EOS)
        self.pad_token = token_name("pad_token", PAD)
        self.chat_template = config.get("chat_template", CHAT_TEMPLATE)
        self.bos_id = self.token_id(self.bos_token)
        self.eos_id = self.token_id(self.eos_token)
        self.pad_id = self.token_id(self.pad_token)
        self.user_id = self.token_id(USER)
        self.assistant_id = self.token_id(ASSISTANT)
        self.think_id, self.think_end_id = self.token_id(THINK), self.token_id(THINK_END)
        self.image_id = self.token_id(IMAGE)  # None when the vocabulary has no <image> token

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, show_progress: bool = False) -> "Tokenizer":
        """Learn a byte-level BPE of vocab_size tokens (special tokens included) from texts."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(f"vocab_size {vocab_size} must be at least {MIN_VOCAB_SIZE} "
                                 f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens + 1 merge)")
        if vocab_size > MAX_VOCAB_SIZE:  # the trainer would abort the process, or raise a bare OverflowError
            raise TokenizerError(f"vocab_size {vocab_size} must be at most {MAX_VOCAB_SIZE}")
        backend = _RustTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _SPLITS]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        seen = [0]  # characters the trainer was given

        def counted(texts):
            for text in texts:
                seen[0] += len(text)
                yield text

        backend.train_from_iterator(counted(texts), trainer)
        if not seen[0]:  # else: a tokenizer of bytes and special tokens only, as if nothing were wrong
            raise TokenizerError("no text to train the tokenizer on (an empty corpus?)")
        return cls(backend)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """From a folder holding tokenizer.json (and optionally tokenizer_config.json), or the json file itself."""
        path = Path(path)
        folder, file = (path, path / "tokenizer.json") if path.is_dir() else (path.parent, path)
        if not file.exists():
            raise TokenizerError(f"no tokenizer at {path}: {file} does not exist")
        try:
            backend = _RustTokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{file}: not a readable tokenizer.json ({e})") from e
        config = {}
        config_file = folder / "tokenizer_config.json"
        if config_file.exists():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{config_file}: not UTF-8 text ({e})") from e
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e})") from e
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
        try:
            return cls(backend, config)
        except TokenizerError as e:
            raise TokenizerError(f"{config_file}: {e}") from None

    def files(self) -> dict[str, str]:
        """tokenizer.json and tokenizer_config.json contents, for `nanoseek.save(extra_files=...)`."""
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": [t for t in SPECIAL_TOKENS[3:] if self.token_id(t) is not None],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 30,
            "chat_template": self.chat_template,
        }
        return {
            "tokenizer.json": self.backend.to_str(pretty=False),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        }

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in self.files().items():
            (folder / name).write_text(content, encoding="utf-8")
        return folder

    # ---- plain text ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special token this vocabulary has, name -> id."""
        return {t: i for t in SPECIAL_TOKENS if (i := self.token_id(t)) is not None}

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Special-token strings in text become their ids; bos/eos add those tokens around it."""
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            _check_unicode([text])
            raise
        for wanted, token, token_id in ((bos, self.bos_token, self.bos_id), (eos, self.eos_token, self.eos_id)):
            if wanted and token_id is None:  # a None in the ids would fail far from here
                raise TokenizerError(f"this tokenizer has no {token} token in its vocabulary")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once, in parallel on the Rust side."""
        try:
            encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            _check_unicode(texts)
            raise
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = False) -> decoders.DecodeStream:
        """Incremental decoding for streaming: `s.step(backend, id)` returns new text or None
        (None while a multi-byte character is incomplete). Pass `tokenizer.backend` as backend."""
        return decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """OpenAI-style messages -> the prompt text, exactly as CHAT_TEMPLATE renders it."""
        return "".join(text for text, _ in self._chat_segments(messages, add_generation_prompt))

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def encode_chat_for_training(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """ids of the whole conversation and a mask that is True on assistant tokens only: each
        reply and the end-of-sentence after it (the model must learn to stop), not the role tokens."""
        ids: list[int] = []
        mask: list[bool] = []
        # Segments end at special tokens, which the pre-tokenizer never merges across, so encoding
        # piece by piece gives the same ids as encoding the rendered text at once.
        for text, trained in self._chat_segments(messages, add_generation_prompt=False):
            piece = self.encode(text)
            ids += piece
            mask += [trained] * len(piece)
        return ids, mask

    def _chat_segments(self, messages: list[dict], add_generation_prompt: bool) -> Iterator[tuple[str, bool]]:
        """(text, is_assistant_output) pieces of the rendered conversation."""
        if not isinstance(messages, list) or not messages:
            raise TokenizerError("messages must be a non-empty list of {'role', 'content'} objects")
        contents = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise TokenizerError(f"message {i}: needs 'role' in {ROLES}, got {m!r:.80}")
            contents.append(self._content_text(m.get("content"), i))
        system = "\n\n".join(c for m, c in zip(messages, contents) if m["role"] == "system")
        yield self.bos_token + system, False
        for m, content in zip(messages, contents):
            if m["role"] == "user":
                yield USER + content, False
            elif m["role"] == "assistant":
                yield ASSISTANT, False
                yield content + self.eos_token, True
        if add_generation_prompt:
            yield ASSISTANT, False

    @staticmethod
    def _content_text(content, index: int) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            parts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif kind in ("image_url", "image"):
                    parts.append(IMAGE)
                else:
                    raise TokenizerError(f"message {index}: content part {part!r:.80} is not text or an image")
            return "".join(parts)
        raise TokenizerError(f"message {index}: 'content' must be a string or a list of parts, got {type(content).__name__}")


def lone_surrogates(text: str) -> str | None:
    """The first run of lone surrogates in text, or None: what no tokenizer can take, and what Python
    makes (surrogateescape) of input bytes that are not UTF-8, or JSON of an escape like "\\ud800"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return text[e.start:e.end]
    return None


def _check_unicode(texts: Iterable) -> None:
    """A TokenizerError for a text the Rust side cannot take (see lone_surrogates), such as a piped prompt."""
    for text in texts:
        if isinstance(text, str) and (bad := lone_surrogates(text)) is not None:
            raise TokenizerError(f"the text is not valid Unicode: it holds {bad!r} (bytes that are not UTF-8?)")


# ---- corpus reading, shared with nanoseek.data ---------------------------------------------------
def sample_texts(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """The first max_bytes (UTF-8) of a stream of documents: BPE merges settle long before tens of MB."""
    seen = 0
    for text in documents:
        if seen >= max_bytes:
            return
        data = text.encode("utf-8", "ignore")
        if seen + len(data) > max_bytes:  # the budget ends inside this one: its first whole characters
            yield data[: max_bytes - seen].decode("utf-8", "ignore")
            return
        seen += len(data)
        yield text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("corpus", help="a folder of text/code files, a .txt file, or JSONL with a 'text' field; 'stdlib' = Python's standard library")
    parser.add_argument("--out", required=True, help="folder to write tokenizer.json and tokenizer_config.json into")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-bytes", type=int, default=50_000_000, help="train on at most this much of the corpus")


def run(args) -> int:
    from .data import DataError, iter_documents  # data imports this module, so import here

    if args.max_bytes < 1:  # 0 would train a tokenizer without a single merge
        print(f"nanoseek tokenizer: error: --max-bytes {args.max_bytes}: must be a whole number >= 1", file=sys.stderr)
        return 2
    start = time.perf_counter()
    texts = (text for _, text in iter_documents(args.corpus))
    try:
        tok = Tokenizer.train(sample_texts(texts, args.max_bytes), args.vocab_size, show_progress=sys.stderr.isatty())
    except (DataError, TokenizerError) as e:  # bad input: a message, not a traceback
        print(f"nanoseek tokenizer: error: {e}", file=sys.stderr)
        return 2
    try:
        tok.save(args.out)
    except OSError as e:  # an --out that cannot be written: the user's path, not a traceback
        print(f"nanoseek tokenizer: error: cannot write to {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"tokenizer: {tok.vocab_size} tokens, trained in {time.perf_counter() - start:.1f}s, saved to {args.out}")
    return 0
