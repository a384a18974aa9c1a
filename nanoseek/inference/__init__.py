"""Inference: latent KV cache, compiled decode, continuous batching, MTP speculative decoding.

    nanoseek.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)      # new tokens of each prompt
    engine = Engine(model, max_batch_size=8); engine.start(); engine.submit(ids, SamplingParams(...))
"""

from .cache import LatentCache
from .engine import Engine, Event, Request
from .generate import generate, stream
from .sampling import SamplingParams

__all__ = ["Engine", "Event", "LatentCache", "Request", "SamplingParams", "generate", "stream"]
