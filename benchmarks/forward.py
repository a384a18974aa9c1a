"""Forward-pass speed of nanoseek against transformers' DeepseekV3ForCausalLM, on the same weights.

Prints, per dtype (fp32, and bf16 where the CPU has native bf16 matmuls):
- forward time at prefill 1x512 and at a training-size batch 8x512, for both implementations;
- the same time against the bound 2 x activated matmul parameters x tokens / matmul throughput,
  with the throughput of a 1024^3 matmul measured in this run;
- one MoE layer against a dense SwiGLU with the same activated FLOPs.

    python benchmarks/forward.py [--preset tiny] [--repeat 5] [--threads 1 --clock cpu]
    python benchmarks/forward.py --preset medium --repeat 3     # four times as wide: matmul-bound
"""

import argparse
import tempfile
import time

import torch

import nanoseek
from nanoseek.model.layers import MLP
from nanoseek.model.params import count_parameters
from nanoseek.runtime import tune_allocator


CLOCK = time.perf_counter


def timed(fn, repeat: int) -> float:
    """Fastest of `repeat` runs after one warm-up, in seconds: on a shared machine the minimum is the
    figure least disturbed by other processes."""
    fn()
    times = []
    for _ in range(repeat):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return min(times)


def matmul_flops(dtype: torch.dtype, repeat: int) -> float:
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    return 2 * 1024**3 / timed(lambda: a @ b, repeat * 4)


def cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: this process's CPU time, which other processes barely disturb (use with --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    tune_allocator()  # applies to both implementations: they share this process
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    config = nanoseek.get_preset(args.preset).replace(num_nextn_predict_layers=0)
    counts = count_parameters(config)
    matmul_params = counts["activated"] - counts["parts"]["embeddings"]
    print(f"preset {args.preset}: {counts['total'] / 1e6:.2f}M parameters, {matmul_params / 1e6:.2f}M activated "
          f"matmul parameters per token; torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as folder:
        nanoseek.save(nanoseek.build_model(config, seed=0), folder)
        ours32 = nanoseek.load(folder, dtype=torch.float32).eval()
        hf32 = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    dtypes = [torch.float32] + ([torch.bfloat16] if cpu_has_bf16() else [])
    rows = []
    for dtype in dtypes:
        ours = nanoseek.checkpoint.build_model(config, dtype=dtype, init=False)
        ours.load_state_dict(ours32.state_dict())
        ours.eval()
        hf = hf32.to(dtype)
        peak = matmul_flops(dtype, args.repeat)
        name = str(dtype).removeprefix("torch.")
        print(f"\n{name}: matmul 1024^3 reaches {peak / 1e9:.0f} GFLOP/s")
        print(f"{'shape':>6} {'impl':>13} {'ms':>8} {'GFLOP/s':>8} {'x bound':>8}")
        for batch, seq in ((1, 512), (8, 512)):
            ids = torch.randint(0, config.vocab_size, (batch, seq))
            bound = 2 * matmul_params * batch * seq / peak
            results = {}
            with torch.inference_mode():
                results["nanoseek"] = timed(lambda: ours(ids), args.repeat)
                results["transformers"] = timed(lambda: hf(ids), args.repeat)
            for impl, seconds in results.items():
                work = 2 * matmul_params * batch * seq / seconds
                print(f"{batch}x{seq:<4} {impl:>13} {seconds * 1e3:8.1f} {work / 1e9:8.0f} {seconds / bound:8.2f}")
            print(f"{'':>6} {'speedup':>13} {results['transformers'] / results['nanoseek']:8.2f}x")
            rows.append((name, batch, seq, results, bound))

        # one MoE layer against a dense SwiGLU doing the same activated FLOPs
        moe = next(layer.mlp for layer in ours.model.layers if layer.is_moe)
        active = (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
        dense = MLP(config.hidden_size, active).to(dtype)
        x = torch.randn(8 * 512, config.hidden_size, dtype=dtype) * 0.5
        with torch.inference_mode():
            t_moe = timed(lambda: moe(x), args.repeat)
            t_dense = timed(lambda: dense(x), args.repeat)
        print(f"MoE layer ({config.n_routed_experts} experts, top-{config.num_experts_per_tok}, "
              f"{config.n_shared_experts} shared) on 4096 tokens: {t_moe * 1e3:.1f} ms; dense SwiGLU of width "
              f"{active}: {t_dense * 1e3:.1f} ms; ratio {t_moe / t_dense:.2f}")


if __name__ == "__main__":
    main()
