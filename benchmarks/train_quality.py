"""Training-quality comparisons, each as two `nanoseek train` runs side by side (one thread each, so
machine load hits both alike).

--mode moe-vs-dense (default): MoE against a dense model with the same activated parameters, in the
same wall-clock budget.

Both models are trained by `nanoseek train` with identical settings; the dense one is the same
config with n_routed_experts=0, which turns every layer into a SwiGLU of intermediate_size, and
intermediate_size is set to the width a token activates in an MoE layer ((top-k + shared) x
moe_intermediate_size), so both spend the same matmul FLOPs per token. The two runs go side by
side, one thread each, so machine load hits both alike. Prints steps, tokens, speed and validation
loss of each, and writes one PNG with both validation curves against wall-clock time.

--mode bf16-vs-fp32: the same model trained for the same number of steps under bf16 autocast and in
fp32, to see what bf16 does to the loss curve (and how much faster it gets there).

    python benchmarks/train_quality.py --corpus ../shared/data/text/tinyshakespeare.txt --minutes 5
    python benchmarks/train_quality.py --minutes 10 --dtype fp32 --out runs/q_moe_dense_fp32
    python benchmarks/train_quality.py --corpus stdlib --minutes 10 --dtype fp32 --out runs/q_moe_dense_stdlib
    python benchmarks/train_quality.py --minutes 10 --dtype fp32 --moe-set n_routed_experts=8 \
        --moe-set moe_intermediate_size=256 --moe-set num_experts_per_tok=2 --out runs/q_moe8x256_dense_fp32
    python benchmarks/train_quality.py --minutes 10 --dtype fp32 --set hidden_size=512 --set moe_intermediate_size=256 \
        --set num_attention_heads=8 --set q_lora_rank=192 --set kv_lora_rank=128 --out runs/q_moe_dense_w512_fp32
    python benchmarks/train_quality.py --mode bf16-vs-fp32 --steps 200
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import nanoseek
from nanoseek.model.params import count_parameters
from nanoseek.train.pretrain import parse_set_value


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="../shared/data/text/tinyshakespeare.txt")
    parser.add_argument("--mode", choices=["moe-vs-dense", "bf16-vs-fp32"], default="moe-vs-dense")
    parser.add_argument("--minutes", type=float, default=5.0, help="moe-vs-dense: the wall-clock budget of each run")
    parser.add_argument("--steps", type=int, default=200, help="bf16-vs-fp32: the steps of each run")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="moe-vs-dense: the training dtype of both runs (auto: what `nanoseek train` measures faster)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--out", default=None, help="folder for both runs and the plot (default: a temp folder)")
    parser.add_argument("--moe-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="moe-vs-dense: change the MoE's experts (e.g. moe_intermediate_size=256); the dense "
                             "model's width follows the activated width")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", dest="both_set",
                        help="change the preset for both runs (e.g. hidden_size=512); the dense model's width "
                             "follows the activated width")
    parser.add_argument("--report-only", action="store_true", help="summarise the runs already in --out")
    parser.add_argument("--train-args", default="--batch-size 8 --seq-len 256 --eval-every 50 --eval-batches 20 --lr 2e-3",
                        help="extra `nanoseek train` arguments, the same for both runs")
    args = parser.parse_args()
    if args.corpus != "stdlib" and not Path(args.corpus).exists():  # stdlib: Python's own sources, as the main job
        sys.exit(f"corpus {args.corpus} not found")
    config = nanoseek.get_preset(args.preset)
    if args.moe_set and args.mode != "moe-vs-dense":
        sys.exit("--moe-set changes the MoE of --mode moe-vs-dense only")
    for flag, items in (("--set", args.both_set), ("--moe-set", args.moe_set)):
        if any("=" not in item for item in items):
            sys.exit(f"{flag} takes FIELD=VALUE, got {items}")
        changes = dict(item.partition("=")[::2] for item in items)
        config = config.replace(**{key: parse_set_value(value) for key, value in changes.items()})
    config.validate()
    active_width = (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
    out = Path(args.out or tempfile.mkdtemp(prefix=f"{args.mode}-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [sys.executable, "-m", "nanoseek.cli", "train", "--corpus", args.corpus, "--preset", args.preset,
              "--vocab-size", str(args.vocab_size), "--threads", "1", "--save-every", "0", "--max-new-tokens", "40",
              *[arg for item in args.both_set for arg in ("--set", item)],
              "--set", f"intermediate_size={active_width}", *args.train_args.split()]
    if args.mode == "moe-vs-dense":
        common += ["--minutes", str(args.minutes), "--dtype", args.dtype]
        runs = {"moe": [arg for item in args.moe_set for arg in ("--set", item)], "dense": ["--set", "n_routed_experts=0"]}
    else:
        common += ["--steps", str(args.steps), "--log-every", "1"]
        runs = {"bf16": ["--dtype", "bf16"], "fp32": ["--dtype", "fp32"]}
    procs = {}
    for name, extra in runs.items() if not args.report_only else ():
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(common + ["--out", str(out / name)] + extra, stdout=log, stderr=subprocess.STDOUT)
    for name, proc in procs.items():
        if proc.wait():
            sys.exit(f"{name} run failed; see {out / name}.log")

    steps_flag = args.train_args.split()[args.train_args.split().index("--steps") + 1] if "--steps" in args.train_args.split() else None
    budget = f"{steps_flag} steps" if steps_flag else f"{args.minutes} min" if args.mode == "moe-vs-dense" else f"{args.steps} steps"
    print(f"{args.corpus}, preset {args.preset} (intermediate_size {active_width}), {budget} each, "
          f"side by side on one thread each; runs in {out}")
    print(f"{'model':>6} {'params':>8} {'activated':>9} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'val loss':>9} {'best val':>9}")
    curves, by_step = {}, {}
    for name in runs:
        cfg = nanoseek.load(out / name / "latest").config
        counts = count_parameters(cfg)
        rows = read_rows(out / name)
        val = [(r["elapsed"], r["val_loss"]) for r in rows if "val_loss" in r and "elapsed" in r]
        curves[name] = val if args.mode == "moe-vs-dense" else [(r["step"], r["loss"]) for r in rows]
        by_step[name] = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
        steps = rows[-1]["step"]
        state = json.loads((out / name / "latest" / "trainer_state.json").read_text())
        tokens = steps * state["settings"]["batch_size"] * state["settings"]["seq_len"] * state["settings"]["grad_accum"]
        print(f"{name:>6} {counts['total'] / 1e6:7.2f}M {counts['activated'] / 1e6:8.2f}M {steps:6d} {tokens:9,d} "
              f"{sum(speed) / len(speed):7.0f} {val[-1][1]:9.3f} {min(v for _, v in val):9.3f}")
    if args.mode == "bf16-vs-fp32":
        a, b = (dict(curves[n]) for n in runs)
        gaps = [a[k] - b[k] for k in sorted(a.keys() & b.keys())]
        print(f"train loss bf16 - fp32 per step: mean {sum(gaps) / len(gaps):+.4f}, largest |gap| "
              f"{max(abs(g) for g in gaps):.4f}, over the last 20 steps {sum(gaps[-20:]) / 20:+.4f}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        moe_mode = args.mode == "moe-vs-dense"
        fig, axes = plt.subplots(1, 2 if moe_mode else 1, figsize=(13 if moe_mode else 7, 4.5), squeeze=False)
        ax = axes[0][0]
        for name, points in curves.items():
            xs = [t / 60 for t, _ in points] if moe_mode else [step for step, _ in points]
            ax.plot(xs, [v for _, v in points], marker="o" if moe_mode else None, markersize=3, label=name)
        ax.set_xlabel("wall-clock minutes" if moe_mode else "step")
        ax.set_ylabel("validation loss (nats/token)" if moe_mode else "training loss (nats/token)")
        ax.set_title(("MoE vs dense, same activated parameters: " if moe_mode else "bf16 autocast vs fp32: ")
                     + Path(args.corpus).name)
        ax.grid(alpha=0.3)
        ax.legend()
        if moe_mode:  # the same runs per optimizer step (= per token): the quality side alone
            right = axes[0][1]
            for name, points in by_step.items():
                right.plot(*zip(*points), marker="o", markersize=3, label=name)
            right.set_xlabel("step (same tokens per step for both)")
            right.set_ylabel("validation loss (nats/token)")
            right.set_title("the same runs, per step")
            right.grid(alpha=0.3)
            right.legend()
        fig.tight_layout()
        png = out / f"{args.mode}.png"
        fig.savefig(png, dpi=110)
        print(f"plot: {png}; per-run plots: " + ", ".join(f"{out / n / 'train_plot.png'}" for n in runs))
    except ImportError:
        pass


if __name__ == "__main__":
    main()
