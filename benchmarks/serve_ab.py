"""Side-by-side serving comparison: several `nanoseek serve` variants, their levels interleaved.

    python benchmarks/serve_ab.py --variant "per-step=--stream-interval 0" --variant "10ms=--stream-interval 0.01"
    python benchmarks/serve_ab.py --clients 1 --pairs 5 --variant "a=" --variant "b=--max-batch-size 32"
    python benchmarks/serve_ab.py --variant "t1=OMP_NUM_THREADS=1" --variant "t2=OMP_NUM_THREADS=2"

Every variant serves the same checkpoint (the `tiny` preset with random weights, bf16, --compile,
as benchmarks/serve.py) from its own server process, all started before any measuring; then the
levels alternate A, B, ..., then in reverse order, --pairs times, so that the machine's drift (a
fifth or more within minutes on a shared 2-core machine) falls on every variant alike. A level is
benchmarks/serve.py's: --clients concurrent streaming clients, 16 greedy requests each of 128
tokens after a 32-token prompt. Prints each level's line, then per variant the median tokens/s and,
against the first variant, the ratio within each pair and its median.

FLAGS may start with KEY=VALUE words: environment variables of that variant's server, on top of
OMP_NUM_THREADS=--threads.

Idle servers sit blocked on their pipes, but their memory stays, so compare a few variants at a time.
"""

import argparse
import asyncio
import shlex
import statistics
import tempfile
from pathlib import Path

import torch

import nanoseek
from serve import build_checkpoint, free_port, measure_level, nanoseek_serve_command, run_level, start_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                        help="a name and the extra `nanoseek serve` flags of one variant, after any KEY=VALUE "
                             "environment variables (repeat, 2 or more)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6, help="rounds of one level per variant")
    parser.add_argument("--rounds", type=int, default=16, help="requests each client sends in turn")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="the servers' OMP_NUM_THREADS unless a variant sets it")
    args = parser.parse_args()
    variants = {}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name:
            parser.error(f"--variant {spec!r}: expected NAME=FLAGS")
        words = shlex.split(flags)
        env = {"OMP_NUM_THREADS": str(args.threads)}
        while words and "=" in words[0] and not words[0].startswith("-"):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        variants[name] = (env, words)
    if len(variants) < 2:
        parser.error("give at least two --variant")

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="nanoseek-serve-ab-"))
    folder = build_checkpoint(args.preset, work / "model")
    vocab = nanoseek.get_preset(args.preset).vocab_size
    prompts = [torch.randint(8, vocab, (args.prompt_len,)).tolist() for _ in range(args.clients)]
    urls, procs = {}, []
    try:
        for name, (env, flags) in variants.items():
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = nanoseek_serve_command(folder, port, args.clients, args, ["--compile", *flags])
            procs.append(start_server(command, url, work / f"{name}.log", env))
            asyncio.run(run_level(url, "bench", prompts[:1], 1, 1, 8))  # warm-up
            urls[name] = url
            setting = " ".join([f"{k}={v}" for k, v in env.items()] + flags)
            print(f"{name}: serving with {setting}", flush=True)
        tps = {name: [] for name in urls}
        for i in range(args.pairs):
            for name in (list(urls) if i % 2 == 0 else list(urls)[::-1]):
                r = measure_level(urls[name], "nanoseek", prompts, args.clients, args)
                tps[name].append(r["tps"])
                print(f"{name} {args.clients} clients, pair {i + 1}: {r['summary']}", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    print()
    first = next(iter(tps))
    for name, values in tps.items():
        line = f"{name}: median {statistics.median(values):.0f} tok/s ({', '.join(f'{v:.0f}' for v in values)})"
        if name != first:
            ratios = [b / a for a, b in zip(tps[first], values)]
            line += f"; / {first} per pair {', '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f}"
        print(line)


if __name__ == "__main__":
    main()
