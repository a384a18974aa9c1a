"""`nanoseek generate`: text in, text out, streamed as it is generated.

    nanoseek generate runs/stdlib/latest --prompt "def fib(n):" --max-new-tokens 100
    echo "To be, or not" | nanoseek generate runs/shakespeare/latest --temperature 0.8 --top-p 0.95
    nanoseek generate CKPT --chat --prompt "Hi!" --stop "\\n\\n" --speculative --stats
    nanoseek generate runs/breast-vlm --image scan.png --prompt "What does this breast ultrasound show?"

A prompt read from stdin loses one trailing newline (the one `echo` adds). --stop understands the
escapes \\n, \\t, \\r and \\\\, since a shell passes "\\n" as a backslash and an n.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """Turn the escapes \\n, \\t, \\r and \\\\ into their characters, and nothing else. Not
    codecs' unicode_escape: it reads its input as latin-1, which garbles any other character."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder (config.json + safetensors)")
    parser.add_argument("--prompt", action="append",
                        help="prompt text (repeat for a batch); default: read stdin, less one trailing newline")
    parser.add_argument("--tokenizer", help="folder or tokenizer.json (default: the checkpoint folder)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image before the prompt text (repeatable; implies --chat; needs a vision-language model)")
    parser.add_argument("--no-bos", action="store_true", help="do not start a plain prompt with the bos token")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (or below 1e-5) = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="seed of the first prompt; prompt i gets seed + i")
    parser.add_argument("--stop", action="append", default=[],
                        help="stop string (repeatable); \\n, \\t, \\r and \\\\ stand for a newline, a tab, "
                             "a carriage return and a backslash")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sentence token")
    parser.add_argument("--speculative", type=int, nargs="?", const=-1, default=0, metavar="K",
                        help="MTP speculative decoding with K draft tokens (default K: the model's MTP depth)")
    parser.add_argument("--compile", nargs="?", const="aot", choices=["aot", "dynamo"], default=False,
                        help="compile the decode step: ahead of time (default) or with torch.compile")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="load the weights in this dtype")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    parser.add_argument("--stats", action="store_true", help="print speed and speculation figures to stderr")


def run(args) -> int:
    from ..checkpoint import CheckpointError, load
    from ..config import ConfigError
    from ..runtime import DeviceError, pick_device, set_threads
    from ..tokenizer import Tokenizer, TokenizerError
    from .generate import engine_and_requests
    from .text import TextDecoder

    if args.max_new_tokens < 1:
        print(f"nanoseek generate: --max-new-tokens must be at least 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    try:
        set_threads(args.threads)
        model = load(args.checkpoint, dtype=DTYPES[args.dtype] if args.dtype else None, device=pick_device(args.device)).eval()
        tokenizer = Tokenizer.load(args.tokenizer or args.checkpoint)
    except (CheckpointError, ConfigError, DeviceError, TokenizerError, OSError) as e:
        print(f"nanoseek generate: {e}", file=sys.stderr)
        return 2
    # `echo` ends its line with a newline the prompt did not mean to hold
    try:
        texts = args.prompt if args.prompt else [sys.stdin.read().removesuffix("\n")]
    except UnicodeDecodeError as e:  # a stdin decoding strictly; with surrogateescape the tokenizer says it
        print(f"nanoseek generate: the prompt on stdin is not text in its encoding ({e})", file=sys.stderr)
        return 2
    prompts, images = [], []
    image_errors: tuple = ()
    if args.image:  # only images need Pillow (the `vision` extra)
        from ..image import ImageError, chat_prompt
        image_errors = (ImageError,)
    system = [{"role": "system", "content": args.system}] if args.system else []
    try:
        for text in texts:
            if args.image:  # a user turn holding the images, then the text
                content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": text}]
                ids, row = chat_prompt(tokenizer, system + [{"role": "user", "content": content}], model.config)
                prompts.append(ids)
                images.append(row)
            elif args.chat:
                prompts.append(tokenizer.encode_chat(system + [{"role": "user", "content": text}]))
            else:
                prompts.append(tokenizer.encode(text, bos=not args.no_bos and tokenizer.bos_id is not None))
    except (*image_errors, TokenizerError) as e:  # a bad image, or a prompt that is not UTF-8
        print(f"nanoseek generate: {e}", file=sys.stderr)
        return 2
    stop_ids = [] if args.ignore_eos else sorted({*model.config.eos_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])})
    try:
        stop = [unescape(s) for s in args.stop]
        decoders = [TextDecoder(tokenizer, stop) for _ in prompts]  # each request's text and stop test
        # as nanoseek.generate: prompt i gets seed + i, and a cache length shared by similar runs
        engine, requests = engine_and_requests(
            model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.min_p,
            args.repetition_penalty, args.seed, stop_ids, speculative=True if args.speculative == -1 else args.speculative,
            compile=args.compile, images=images or None, stops=decoders)
    except ValueError as e:
        print(f"nanoseek generate: {e}", file=sys.stderr)
        return 2

    start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        if len(requests) == 1:  # stream the one continuation as it comes
            while engine.has_work:
                engine.step()
                print(decoders[0].take(), end="", flush=True)
            print(decoders[0].take(final=True))
        else:
            engine.run_until_done()
            for i, decoder in enumerate(decoders):
                print(f"--- {i}\n{decoder.take(final=True)}")
    except BrokenPipeError:  # the reader has gone (`... | head`): stop quietly, as other tools do
        # Python flushes stdout once more at exit, which would fail again with a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    if args.stats:
        s = engine.stats()
        n = s["generated_tokens"]
        line = (f"{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s, {cpu / max(n, 1) * 1000:.2f} CPU ms/token; "
                f"finish: {', '.join(r.finish_reason for r in requests)}")
        if s["drafted_tokens"]:  # none when every request ended at its first token, before any decode step
            line += (f"; first draft accepted {s['first_draft_acceptance']:.1%}, drafts accepted "
                     f"{s['acceptance_rate']:.1%}, {s['tokens_per_forward']:.2f} tokens per main-model forward")
        print(line, file=sys.stderr)
    return 0
