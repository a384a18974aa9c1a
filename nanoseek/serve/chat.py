"""`nanoseek chat`: talk to a model in the terminal; the reply streams as it is generated.

    nanoseek chat --model runs/chat/latest [--system "You are terse."] [--temperature 0.7]

The conversation is kept: every turn sends the whole history through the chat template. /reset
starts over, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply midway. After each reply a line says
how many tokens went in and came out and how fast. Runs the engine in this process, on the same
text layer as the server (`textgen`).
"""

from __future__ import annotations

import queue
import sys
import time

from ..inference.sampling import SamplingParams
from .textgen import load_generator

HELP = "/reset starts a new conversation, /exit leaves (Ctrl-C stops a reply, Ctrl-D exits)"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, weights, tokenizer.json)")
    parser.add_argument("--system", default=None, help="a system prompt to start each conversation with")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 (or below 1e-5) is greedy")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--max-seq-len", type=int, default=None, help="context (default: the model's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: as stored")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    parser.add_argument("--speculative", type=int, default=0, help="MTP draft tokens per step (0: off)")
    parser.add_argument("--compile", action="store_true",
                        help="build the decode steps ahead of time (torch.export + AOTInductor) before the first "
                             "message; kept in $NANOSEEK_CACHE/aot (default ~/.cache/nanoseek/aot), so later starts load them")


def run(args) -> int:
    from ..checkpoint import CheckpointError
    from ..tokenizer import TokenizerError

    if args.max_tokens < 1:  # before loading the model, not at the first message
        print(f"nanoseek chat: --max-tokens must be at least 1, got {args.max_tokens}", file=sys.stderr)
        return 2
    if args.max_seq_len is not None and args.max_seq_len < 2:  # 0 would quietly mean the model's
        print(f"nanoseek chat: --max-seq-len must be at least 2, got {args.max_seq_len}", file=sys.stderr)
        return 2
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)  # before the load too
        generator = load_generator(args.model, dtype=args.dtype, max_batch_size=1, max_seq_len=args.max_seq_len,
                                   speculative=args.speculative, compile=args.compile, device=args.device)
    except (CheckpointError, TokenizerError, ValueError, FileNotFoundError) as e:
        print(f"nanoseek chat: {e}", file=sys.stderr)
        return 2
    generator.engine.start()
    try:
        return converse(generator, args, params)
    finally:  # a daemon engine thread still running at exit can abort the interpreter ("terminate called ...")
        generator.engine.stop(timeout=10)


def converse(generator, args, params: SamplingParams) -> int:
    """The read-reply loop, until /exit or end of input."""
    from ..tokenizer import TokenizerError

    tokenizer, context = generator.tokenizer, generator.context_length
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print(f"chatting with {args.model} ({context}-token context). {HELP}", flush=True)
    while True:
        try:
            line = input(">>> ").strip()
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        except UnicodeDecodeError as e:  # a strictly decoding terminal; the conversation goes on
            print(f"(that line is not text in the terminal's encoding: {e})", flush=True)
            continue
        if line == "/exit":
            return 0
        if line == "/reset":
            messages = list(start)
            print("(new conversation)", flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: {HELP}", flush=True)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = tokenizer.encode_chat(messages)
        except TokenizerError as e:  # bytes that are not UTF-8 reach us as lone surrogates
            messages.pop()
            print(f"({e}; the message was not sent)", flush=True)
            continue
        room = context - len(prompt)
        if room < 1:
            messages.pop()
            print(f"(the conversation is {len(prompt)} tokens, beyond the {context}-token context: /reset)", flush=True)
            continue
        try:
            reply = stream_reply(generator, prompt, params, min(args.max_tokens, room))
        except ValueError as e:  # refused at submit, e.g. a literal "<image>" typed to a vision model
            messages.pop()
            print(f"({e}; the message was not sent)", flush=True)
            continue
        if reply is None:  # the engine failed it: the turn is not kept, the conversation goes on
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def stream_reply(generator, prompt: list[int], params: SamplingParams, max_tokens: int) -> str | None:
    """Print the reply as it arrives; returns its text (what arrived, if stopped with Ctrl-C), or
    None when the engine failed it (said in a line)."""
    events: queue.Queue = queue.Queue()
    started = time.perf_counter()
    generation = generator.submit(prompt, params, max_tokens=max_tokens, on_text=lambda d, e: events.put((d, e)))
    reply = ""
    try:
        while True:
            delta, event = events.get()
            reply += delta
            print(delta, end="", flush=True)
            if event.finished:
                break
    except KeyboardInterrupt:
        generation.request.cancel()
        generation.request.wait()
    request = generation.request
    out = len(request.tokens)
    first = request.first_token_at or started
    rate = (out - 1) / (request.finished_at - first) if out > 1 and request.finished_at else 0.0
    if request.finish_reason == "error":  # else a failed reply looked like a finished one and joined the history
        why = (request.error or "").strip().splitlines()[-1:] or ["unknown error"]
        print(f"\n(the reply failed: {why[0]}; it was not kept)", flush=True)
        return None
    stopped = {"length": ", cut at max tokens", "cancelled": ", stopped"}.get(request.finish_reason, "")
    print(f"\n({len(prompt)} tokens in, {out} out, {rate:.1f} tokens/s{stopped})", flush=True)
    return reply
