"""Decode speed: nanoseek (eager, compiled, MTP speculative) against transformers' generate, one run, one checkpoint.

    python benchmarks/decode.py                                  # tiny preset, random weights
    python benchmarks/decode.py --checkpoint runs/stdlib/latest --prompt-file some.txt --draft-tokens 1 2 3

Without --checkpoint the `tiny` preset (the config of shared/notes/measurements.md) is built with
random weights and saved to a temporary folder; both engines load that folder. Decode tokens/s is
measured as generated tokens after the first over the time after the first, (N - 1) / (t_N - t_1),
best of --repeats, so prefill is left out for every engine alike; CPU ms per token is process time
over the same tokens. Speculative rows need an MTP-trained checkpoint: with random weights the
drafts are noise and nearly all are rejected. Shared machines are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import nanoseek
from nanoseek.inference import LatentCache
from nanoseek.runtime import tune_allocator


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="checkpoint folder (default: the tiny preset with random weights)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--prompt-file", help="text to cut prompts from (needs a tokenizer in the checkpoint)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--draft-tokens", type=int, nargs="*", default=[1, 2, 3])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--device", default="cpu", help="cpu or cuda: every contender runs there")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-eager", action="store_true")
    p.add_argument("--bf16", action="store_true", help="also nanoseek with the weights loaded in bfloat16")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; needs a tokenizer in the checkpoint)")
    return p.parse_args()


def make_prompts(args, config, checkpoint: str) -> list[list[int]]:
    n = max(args.batch)
    if args.prompt:
        from nanoseek.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(checkpoint)
        return [tokenizer.encode(args.prompt[i % len(args.prompt)], bos=True) for i in range(n)]
    if args.prompt_file:
        from nanoseek.tokenizer import Tokenizer

        ids = Tokenizer.load(checkpoint).encode(open(args.prompt_file).read())
        step = max(1, (len(ids) - args.prompt_len) // n)
        return [ids[i * step : i * step + args.prompt_len] for i in range(n)]
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (n, args.prompt_len), generator=g).tolist()


def timed(fn, repeats: int):
    """Best (wall, cpu) seconds of fn() over repeats."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def decode_rate(run, batch: int, n: int, repeats: int):
    """run(max_new_tokens) -> tokens/s and CPU ms per token of the decode phase."""
    run(n)  # warm up (compiles on first use)
    wall_1, cpu_1 = timed(lambda: run(1), repeats)
    wall_n, cpu_n = timed(lambda: run(n), repeats)
    tokens = batch * (n - 1)
    return tokens / max(wall_n - wall_1, 1e-9), 1000 * max(cpu_n - cpu_1, 0) / tokens


def main() -> int:
    args = parse_args()
    tune_allocator()  # as the nanoseek command does; every contender shares this process
    torch.set_num_threads(args.threads)
    tmp = None
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        tmp = tempfile.TemporaryDirectory()
        checkpoint = tmp.name
        nanoseek.save(nanoseek.build_model(nanoseek.get_preset(args.preset), seed=0), checkpoint)
    device = torch.device(args.device)
    model = nanoseek.load(checkpoint, dtype=torch.float32, device=device).eval()
    models = {"": model}
    if args.bf16:
        models[" bf16"] = nanoseek.load(checkpoint, dtype=torch.bfloat16, device=device).eval()
    config = model.config
    prompts = make_prompts(args, config, checkpoint)
    N, R = args.new_tokens, args.repeats
    print(f"# decode benchmark: {checkpoint if args.checkpoint else args.preset + ' preset, random weights'}; "
          f"prompt {args.prompt_len} tokens, {N} new tokens, greedy, "
          + (f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device))
          + (", fp32 and nanoseek in bf16" if args.bf16 else ", fp32"))
    print(f"# torch {torch.__version__}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    rows, reference, outputs = [], {}, {}
    hf = None
    if not args.no_transformers:
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval().to(device)

    for B in args.batch:
        batch = prompts[:B]
        if hf is not None:  # prompts of different lengths are padded on the left, as transformers wants
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)

            def run_hf(n, ids=ids, mask=mask):
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
                outputs[("transformers", B)] = out[:, ids.shape[1]:].tolist()

            tps, cpu = decode_rate(run_hf, B, N, R)
            reference[B] = tps
            rows.append(("transformers generate (eager)", B, tps, cpu, ""))
            print(f"# transformers, batch {B}: {tps:,.0f} tok/s", flush=True)

        for suffix, m in models.items():
            variants = [] if args.no_eager or suffix else [("nanoseek eager", dict())]
            variants.append((f"nanoseek compiled{suffix}", dict(compile=True)))
            variants += [(f"nanoseek compiled{suffix} + MTP k={k}", dict(compile=True, speculative=k))
                         for k in args.draft_tokens if config.num_nextn_predict_layers]
            plain = None
            for name, kwargs in variants:
                stats = {}

                def run_ns(n, kwargs=kwargs, name=name, m=m):
                    out, st = nanoseek.generate(m, batch, n, stop_token_ids=[], return_stats=True, **kwargs)
                    outputs[(name, B)] = out
                    stats.update(st)

                tps, cpu = decode_rate(run_ns, B, N, R)
                note = ""
                if "speculative" in kwargs:
                    note = (f"first draft accepted {stats['first_draft_acceptance']:.0%}, "
                            f"{stats['tokens_per_forward']:.2f} tokens/forward; vs compiled{suffix}: "
                            f"{tps / plain[0]:.2f}x tokens/s, CPU/token {cpu / plain[1] - 1:+.0%}")
                elif kwargs.get("compile"):
                    plain = (tps, cpu)
                rows.append((name, B, tps, cpu, note))
                print(f"# {name}, batch {B}: {tps:,.0f} tok/s {note}", flush=True)

    print("\n| engine | batch | decode tok/s | CPU ms/token | vs transformers | notes |")
    print("|---|---|---|---|---|---|")
    for name, B, tps, cpu, note in rows:
        ratio = f"{tps / reference[B]:.1f}x" if B in reference else ""
        print(f"| {name} | {B} | {tps:,.0f} | {cpu:.2f} | {ratio} | {note} |")

    for B in args.batch:
        ref = outputs.get(("transformers", B))
        for (name, b), out in outputs.items():
            if b == B and ref is not None and name != "transformers":
                same = sum(x == y for x, y in zip(out, ref))
                print(f"# batch {B}: {name} greedy tokens identical to transformers for {same}/{B} sequences")

    cache = LatentCache(config, 1, 1, torch.float32)
    expected = (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert cache.bytes_per_token_per_layer == expected
    expanded = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 4
    print(f"\nlatent cache: {cache.bytes_per_token_per_layer} bytes per token per layer = (kv_lora_rank "
          f"{config.kv_lora_rank} + qk_rope_head_dim {config.qk_rope_head_dim}) x 4 bytes (fp32); keys and values "
          f"expanded per head would take {expanded} bytes, {expanded / expected:.1f}x more")
    if hf is not None:
        with torch.inference_mode():
            out = hf(torch.tensor(prompts[:1], device=device), use_cache=True)
        layer = (getattr(out, "cache", None) or out.past_key_values).layers[0]
        hf_bytes = sum(t[0, :, 0].numel() * t.element_size() for t in (layer.keys, layer.values))
        print(f"transformers' cache, measured: {hf_bytes} bytes per token per layer (keys {tuple(layer.keys.shape)}, "
              f"values {tuple(layer.values.shape)} for a {len(prompts[0])}-token prompt)")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
