"""`nanoseek demo`: build a preset model with random weights, print its size and a greedy continuation.

A smoke test of the whole model path that needs no data and no checkpoint.
"""

import argparse
import time

import torch

from .config import PRESETS, get_preset
from .model.params import format_counts
from .model.transformer import build_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    small = sorted(name for name in PRESETS if not name.startswith("deepseek"))
    parser.add_argument("--preset", default="tiny", choices=small)
    parser.add_argument("--tokens", type=int, default=16, help="how many tokens to continue")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    config = get_preset(args.preset)
    print(format_counts(args.preset, config))
    model = build_model(config, seed=args.seed).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (1, 8), generator=generator)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(args.tokens):
            next_id = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    elapsed = time.perf_counter() - start
    print(f"prompt ids {ids[0, :8].tolist()}")
    print(f"greedy continuation {ids[0, 8:].tolist()} ({args.tokens / elapsed:.0f} tokens/s, no cache)")
    return 0
