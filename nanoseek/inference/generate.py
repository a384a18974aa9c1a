"""`nanoseek.generate`: continue a batch of token-id prompts, all at once or as a stream.

Both run the continuous-batching engine with one slot per prompt, so there is one decode path, and
so does the generate command. Greedy by default; temperature > 0 samples (below 1e-5 it is still
greedy: see sampling.py). Prompt i gets seed `seed + i` (modulo 2**63, as the server does; a fresh random seed each when seed is
None), so a seed reproduces every output whatever the batch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from ..model.transformer import DeepSeekModel
from .engine import Engine
from .sampling import INT64_LIMIT, SamplingParams


def cache_length(model: DeepSeekModel, longest: int) -> int:
    """The max_seq_len of an engine for sequences up to `longest` tokens: rounded up to a power of two
    (at least 256, at most the model's context), so that runs of similar lengths share one compiled
    step (a compiled step is specialised to the cache's shape, and kept on disk by it)."""
    return min(model.config.max_position_embeddings, max(256, 1 << (max(longest, 1) - 1).bit_length()))


@contextlib.contextmanager
def _mode_kept(model: DeepSeekModel):
    """The engine puts the model in eval mode (vision drop-path off): a training loop that samples
    from its model gets the model's mode back afterwards."""
    training = model.training
    try:
        yield
    finally:
        model.train(training)


def engine_and_requests(model: DeepSeekModel, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                        repetition_penalty=1.0, seed=None, stop_token_ids=None, stop=None, speculative=False,
                        compile=False, images=None, stops=None):
    """An engine holding one slot per prompt, and the prompts submitted to it (what `generate` and
    the generate command run). stops: one stop callable per prompt, instead of `stop` for all."""
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise ValueError("prompts must be a non-empty list of token-id lists (one per sequence)")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images must hold one list per prompt ({len(prompts)}), got {len(images)}")
    draft_tokens = int(speculative) if not isinstance(speculative, bool) else (
        max(1, model.config.num_nextn_predict_layers) if speculative else 0)
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, max_batch_size=len(prompts), max_seq_len=cache_length(model, longest),
                    speculative=draft_tokens, compile=compile)
    requests = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty,
                                None if seed is None else (seed + i) % INT64_LIMIT)
        requests.append(engine.submit(prompt, params, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids,
                                      stop=stops[i] if stops is not None else stop,
                                      images=images[i] if images is not None else None))
    return engine, requests


def stream(model: DeepSeekModel, prompts: list[list[int]], max_new_tokens: int = 256, *, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
           seed: int | None = None, stop_token_ids: list[int] | None = None,
           stop: Callable[[list[int]], bool] | None = None, speculative: bool | int = False,
           compile: bool | str = False, images: list[list] | None = None) -> Iterator[tuple[int, list[int]]]:
    """Yield (prompt index, new token ids) as each step produces them. Arguments as `generate`."""
    with _mode_kept(model):
        engine, requests = engine_and_requests(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                               repetition_penalty, seed, stop_token_ids, stop, speculative, compile,
                                               images)
        index = {r.id: i for i, r in enumerate(requests)}
        while engine.has_work:
            engine.step()
            for request in requests:
                for event in request.poll():
                    if event.tokens:
                        yield index[request.id], event.tokens


def generate(model: DeepSeekModel, prompts: list[list[int]], max_new_tokens: int = 256, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
             seed: int | None = None, stop_token_ids: list[int] | None = None,
             stop: Callable[[list[int]], bool] | None = None, speculative: bool | int = False,
             compile: bool | str = False, return_stats: bool = False, images: list[list] | None = None):
    """Continue each prompt (token-id lists of any lengths); returns the new token ids of each.

    stop_token_ids: None stops at the model's eos ids, [] never stops early; stop tokens are not
    included in the output. stop: a callable on the tokens so far (e.g. `text.StopStrings`).
    speculative: True drafts with the MTP modules (as many tokens as the model has modules), an int
    sets the draft length; greedy output is identical to plain decoding and sampled output has the
    same distribution. compile: compile the decode step (True: ahead of time; "dynamo": torch.compile;
    see `Engine`), eager with a warning if that fails.
    return_stats: also return the engine's counters (acceptance rate, tokens per forward, ...).
    images: for a vision-language model, one list of preprocessed images per prompt, each prompt
    holding their runs of image_token_id (build both with `nanoseek.image.chat_prompt`).
    """
    with _mode_kept(model):
        engine, requests = engine_and_requests(model, prompts, max_new_tokens, temperature, top_k, top_p, min_p,
                                               repetition_penalty, seed, stop_token_ids, stop, speculative, compile,
                                               images)
        engine.run_until_done()
    outputs = [r.result() for r in requests]
    return (outputs, engine.stats()) if return_stats else outputs
