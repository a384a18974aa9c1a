"""Tokenizer: byte-level round trip, special tokens, chat template equal to transformers' rendering."""

import json

import pytest

from nanoseek.tokenizer import ASSISTANT, BOS, EOS, IMAGE, SPECIAL_TOKENS, THINK, USER, Tokenizer, TokenizerError

CORPUS = [
    "def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer\n",
    "Grüße aus Köln! Ça va? 東京は晴れ。 числа 12345 и эмодзи 🙂\n",
] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, vocab_size=400)


def test_round_trip_non_ascii_and_special_tokens(tok):
    text = "naïve café — 中文 🙂\tx = 'ü'\n" + USER + "hi" + ASSISTANT + THINK + "ok" + EOS + " \x00\x7f"
    ids = tok.encode(text, bos=True)
    assert ids[0] == tok.bos_id == 0 and tok.eos_id == 1
    assert tok.decode(ids) == BOS + text
    # each special token is one id, never split into bytes
    for name, token_id in tok.special_ids.items():
        assert tok.encode(f"a{name}b").count(token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(USER, "").replace(ASSISTANT, "").replace(THINK, "").replace(EOS, "")
    # unseen characters still round-trip through bytes
    assert tok.decode(tok.encode("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃")) == "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃"


def test_special_token_ids_and_vocab(tok):
    assert tok.vocab_size == 400
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.image_id == tok.token_id(IMAGE) is not None
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train(CORPUS, vocab_size=100)


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi, wie geht's?"},
    {"role": "assistant", "content": THINK + "greet" + "</think>Hallo!"},
    {"role": "user", "content": [{"type": "text", "text": "What is this? "}, {"type": "image_url", "image_url": {"url": "x"}}]},
]


def test_saved_tokenizer_loads_in_transformers_with_same_chat_template(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save(tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    text = "x = 'ü'  # 東京\n" + USER
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    for gen in (True, False):
        rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert rendered == tok.render_chat(MESSAGES, add_generation_prompt=gen)
    assert tok.render_chat(MESSAGES).endswith(IMAGE + ASSISTANT)
    assert Tokenizer.load(tmp_path).encode(text) == tok.encode(text)
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode(text) == tok.encode(text)


def test_training_mask_covers_assistant_replies_only(tok):
    ids, mask = tok.encode_chat_for_training(MESSAGES[:3])
    assert ids == tok.encode(tok.render_chat(MESSAGES[:3], add_generation_prompt=False))
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == THINK + "greet</think>Hallo!" + EOS


def test_bad_messages_are_named(tok):
    with pytest.raises(TokenizerError, match="message 1"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(TokenizerError, match="content"):
        tok.render_chat([{"role": "user", "content": 3}])


def test_deepseek_style_tokenizer_json_loads(tok, tmp_path):
    """A DeepSeek release names its tokens in tokenizer_config.json as dicts; ids come from the vocab."""
    (tmp_path / "tokenizer.json").write_text(tok.files()["tokenizer.json"])
    config = {"bos_token": {"content": BOS, "__type": "AddedToken"}, "eos_token": {"content": EOS}, "pad_token": None,
              "chat_template": "{{ bos_token }}"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.load(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.user_id) == (0, 1, tok.user_id)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope")


def test_tokenizer_command_answers_a_missing_corpus_with_a_message(tmp_path, capsys):
    from nanoseek.cli import main

    assert main(["tokenizer", str(tmp_path / "missing"), "--out", str(tmp_path / "tok")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "tok").exists()


def test_minimum_vocab_size_is_exact():
    from nanoseek.tokenizer import MIN_VOCAB_SIZE

    assert MIN_VOCAB_SIZE == 256 + len(SPECIAL_TOKENS) + 1
    assert Tokenizer.train(CORPUS, vocab_size=MIN_VOCAB_SIZE).vocab_size == MIN_VOCAB_SIZE
    with pytest.raises(TokenizerError, match=f"vocab_size {MIN_VOCAB_SIZE - 1} must be at least {MIN_VOCAB_SIZE}"):
        Tokenizer.train(CORPUS, vocab_size=MIN_VOCAB_SIZE - 1)


def test_encode_with_a_missing_bos_token_is_named(tok, tmp_path):
    (tmp_path / "tokenizer.json").write_text(tok.files()["tokenizer.json"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    loaded = Tokenizer.load(tmp_path)
    assert loaded.encode("hi") == tok.encode("hi")
    with pytest.raises(TokenizerError, match="no <s> token"):
        loaded.encode("hi", bos=True)
    with pytest.raises(TokenizerError, match="no </s> token"):
        loaded.encode("hi", eos=True)
