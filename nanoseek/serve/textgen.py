"""Text on top of the engine: token ids out of the engine become streamed text, ended by stop strings.

Shared by the server and the terminal chat; the engine speaks token ids and this layer owns the
tokenizer. Every request gets a `TextDecoder` (inference/text.py), which the engine calls on its
own thread after each new token (it is the request's `stop` callable): it detokenizes
incrementally and ends the request as soon as a stop string appears.

    gen = TextGenerator(engine, tokenizer)
    g = gen.submit(prompt_ids, SamplingParams(), max_tokens=64, stop=["\\n\\n"], on_text=callback)
    # callback(delta: str, event) runs on the engine thread after every step of this request
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..inference.aot import padded_batch
from ..inference.engine import ATTEND_BLOCK, Engine, Event, Request, check_lengths
from ..inference.sampling import SamplingParams
from ..inference.text import TextDecoder
from ..tokenizer import Tokenizer


@dataclass
class Generation:
    """One submitted generation: the engine's request and its text."""

    request: Request
    text: TextDecoder | None  # None when the text is made elsewhere (see TextGenerator.submit)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's names: "stop" (end-of-sentence or a stop string) or "length"; also "cancelled", "error"."""
        return self.request.finish_reason

    @property
    def usage(self) -> dict:
        return self.request.usage


class TextGenerator:
    """The engine and the tokenizer together: submit token ids, receive text deltas."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer):
        self.engine = engine
        self.tokenizer = tokenizer
        # end of sentence as the model config and the tokenizer know it (usually the same id)
        eos = set(engine.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.stop_token_ids = sorted(eos)

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    @property
    def accepts_images(self) -> bool:
        return self.engine.model.vision is not None

    def submit(self, prompt_ids: list[int], params: SamplingParams, *, max_tokens: int, stop: list[str] = (),
               ignore_eos: bool = False, on_text: Callable[[str, Event], None] | None = None,
               images: list | None = None, detokenize: bool = True) -> Generation:
        """Queue a generation. on_text(delta, event) is called on the engine thread after each of its
        steps (delta may be empty while text is held back); the last call has event.finished set.
        images: the prompt's preprocessed images, in the order of its image-token runs.
        detokenize=False: no text on this thread (deltas are ""; the event's tokens are the output)
        unless stop strings need it; the engine process leaves the text to the server's process."""
        text = TextDecoder(self.tokenizer, stop) if detokenize or any(stop) else None

        def on_event(event: Event) -> None:
            delta = text.take(final=event.finished) if text is not None else ""
            if on_text is not None:
                on_text(delta, event)

        request = self.engine.submit(prompt_ids, params, max_new_tokens=max_tokens, stop=text, on_event=on_event,
                                     stop_token_ids=[] if ignore_eos else self.stop_token_ids, images=images)
        return Generation(request, text)


def load_generator(path, *, dtype: str | None = None, max_batch_size: int = 8, max_seq_len: int | None = None,
                   max_cached_tokens: int | None = None, speculative: int = 0, compile: bool = False,
                   device: str = "cpu") -> TextGenerator:
    """A checkpoint folder (weights + tokenizer.json) -> a warmed-up TextGenerator; the engine is not started."""
    import torch

    from .. import checkpoint
    from ..runtime import pick_device

    check_lengths(max_seq_len, max_cached_tokens)  # the engine's own check, before the load (minutes, for a big model)
    model = checkpoint.load(path, dtype=getattr(torch, dtype) if dtype else None, device=pick_device(device)).eval()
    tokenizer = Tokenizer.load(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    if max_cached_tokens:
        # one request can hold no more than the whole cache may (prompt + max_tokens + draft tokens):
        # that is its context, which the server reports and fills when a request names no max_tokens
        max_seq_len = min(max_seq_len or model.config.max_position_embeddings, max_cached_tokens - speculative)
        if max_seq_len < 2:
            raise ValueError(f"max_cached_tokens ({max_cached_tokens}) leaves no room for a prompt and a reply"
                             + (f" with {speculative} draft tokens" if speculative else ""))
    engine = Engine(model, max_batch_size=max_batch_size, max_cached_tokens=max_cached_tokens,
                    max_seq_len=max_seq_len, speculative=speculative, compile=compile)
    # warm up before the first client: one request; when compiling, every batch size a compiled step
    # is built for (powers of two up to max_batch_size, see inference/aot.py), greedy and sampled,
    # running past an attention block, so clients never wait for a build (each costs seconds)
    # cut to fit: a context the flags allow (down to 2 tokens) must not fail the load on the warm-up itself
    ids = tokenizer.encode("Hello", bos=True)[: max(1, engine.max_seq_len - 2)]
    engine.submit(ids, max_new_tokens=min(2, engine.max_seq_len - len(ids)))
    engine.run_until_done()
    if compile:
        n = min(ATTEND_BLOCK + 2, engine.max_seq_len - len(ids))
        sizes = sorted({padded_batch(b, max_batch_size) for b in range(1, max_batch_size + 1)})
        for params in (SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9, seed=0)):
            for size in sizes:
                for _ in range(size):
                    engine.submit(ids, params, max_new_tokens=n, stop_token_ids=[])
                engine.run_until_done()
    return TextGenerator(engine, tokenizer)
