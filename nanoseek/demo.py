"""`nanoseek demo`: build a preset model with random weights, print its size and a greedy continuation.

A smoke test of the whole model path that needs no data and no checkpoint.
"""

import argparse
import sys
import time

import torch

from .config import PRESETS, get_preset
from .model.params import format_counts
from .model.transformer import build_model
from .runtime import DeviceError, pick_device

PROMPT_TOKENS = 8  # a random prompt of this many ids


def add_arguments(parser: argparse.ArgumentParser) -> None:
    small = sorted(name for name in PRESETS if not name.startswith("deepseek"))
    parser.add_argument("--preset", default="tiny", choices=small, help="the model to build (default tiny)")
    parser.add_argument("--tokens", type=int, default=16,
                        help="how many tokens to continue the 8-token prompt by (at least 1; prompt and continuation "
                             "fit the preset's context)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and the prompt")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")


def run(args) -> int:
    if args.tokens < 1:  # nothing to time: a negative count printed a negative speed
        print(f"nanoseek demo: --tokens must be at least 1, got {args.tokens}", file=sys.stderr)
        return 2
    try:
        device = pick_device(args.device)
    except DeviceError as e:
        print(f"nanoseek demo: {e}", file=sys.stderr)
        return 2
    config = get_preset(args.preset)
    room = config.max_position_embeddings - PROMPT_TOKENS
    if args.tokens > room:  # past the context the model would run on positions it is not configured for
        print(f"nanoseek demo: --tokens must be at most {room} ({args.preset}'s context of "
              f"{config.max_position_embeddings} less the {PROMPT_TOKENS}-token prompt), got {args.tokens}", file=sys.stderr)
        return 2
    print(format_counts(args.preset, config))
    # built and drawn on the CPU: the same weights and prompt on any device
    model = build_model(config, seed=args.seed).to(device).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=generator).to(device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.tokens):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    ids = ids.cpu()  # waits for the device, so the time below is the work's
    elapsed = time.perf_counter() - start
    print(f"prompt ids {ids[0, :PROMPT_TOKENS].tolist()}")
    print(f"greedy continuation {ids[0, PROMPT_TOKENS:].tolist()} ({args.tokens / elapsed:.0f} tokens/s, no cache)")
    return 0
