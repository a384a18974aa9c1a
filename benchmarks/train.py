"""Training-step speed of nanoseek against transformers' DeepseekV3ForCausalLM, and MFU.

One step = forward, next-token cross-entropy, backward, gradient clipping, AdamW step, on the same
config, weights, batch and dtype (fp32, and bf16 autocast with fp32 master weights). nanoseek's
step is its real trainer step (`Trainer.train_step`, router-bias update included) without the MTP
and balance losses, which transformers does not have. Steps of the two alternate, so machine load
hits both alike; the matmul throughput that MFU divides by is measured between them, in the same
rounds (median of 1024^3 products), so all three see the same load.

MFU = tokens/s x training FLOPs per token (3 x forward matmul FLOPs of the activated weights,
plus causal attention) / measured 1024^3 matmul FLOP/s in that dtype.

    python benchmarks/train.py [--preset tiny] [--batch 8] [--seq 256] [--steps 6] [--threads N]
    python benchmarks/train.py --preset medium --steps 3    # four times as wide: matmul-bound
"""

import argparse
import os
import statistics
import tempfile
import time

# OpenMP threads that sleep while waiting, as scripts/run.sh sets: on a shared machine spinning
# threads stall each other (several times slower steps); an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)
import torch.nn.functional as F  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek.runtime import tune_allocator  # noqa: E402
from nanoseek.train.metrics import train_flops_per_token  # noqa: E402
from nanoseek.train.trainer import Settings, Trainer  # noqa: E402


class RandomTokens:
    """A fixed stream of random batches (the loader interface the trainer wants)."""

    def __init__(self, vocab: int, batch: int, seq: int):
        self.generator = torch.Generator().manual_seed(0)
        self.vocab, self.batch, self.seq = vocab, batch, seq

    def next_batch(self):
        x = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.generator)
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def hf_step(model, optimizer, loader, autocast):
    inputs, targets = loader.next_batch()
    with autocast:
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per implementation and dtype")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    args = parser.parse_args()
    tune_allocator()  # as the nanoseek command does; both implementations share this process
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    config = nanoseek.get_preset(args.preset).replace(num_nextn_predict_layers=0)
    flops = train_flops_per_token(config, args.seq)
    tokens = args.batch * args.seq
    print(f"preset {args.preset}, batch {args.batch}x{args.seq}, {flops / 1e6:.1f} MFLOP per trained token; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as folder:
        nanoseek.save(nanoseek.build_model(config, seed=0), folder)
        results = {}
        for dtype_name in args.dtypes.split(","):
            ours = nanoseek.load(folder, dtype=torch.float32)
            hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
            settings = Settings(batch_size=args.batch, seq_len=args.seq, steps=10**6, mtp_depth=0, balance_alpha=0.0,
                                dtype=dtype_name, lr=1e-4)
            trainer = Trainer(ours, settings, None, RandomTokens(config.vocab_size, args.batch, args.seq), [], folder)
            # fused, as transformers' Trainer defaults to ("adamw_torch_fused") and as nanoseek's trainer uses
            hf_optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            hf_loader = RandomTokens(config.vocab_size, args.batch, args.seq)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name == "bf16")
            steps = {"nanoseek": trainer.train_step, "transformers": lambda: hf_step(hf, hf_optimizer, hf_loader, autocast)}
            times = {name: [] for name in steps}
            torch_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
            a, b = torch.randn(1024, 1024).to(torch_dtype), torch.randn(1024, 1024).to(torch_dtype)
            peaks = []
            for round_ in range(args.steps + 1):  # round 0 warms up
                for name, step in steps.items():
                    start = time.perf_counter()
                    step()
                    if round_:
                        times[name].append(time.perf_counter() - start)
                # the matmul probe runs between the steps, under the same machine load
                start = time.perf_counter()
                for _ in range(4):
                    a @ b
                if round_:
                    peaks.append(4 * 2 * 1024**3 / (time.perf_counter() - start))
            peak = statistics.median(peaks)
            print(f"\n{dtype_name}: matmul 1024^3 reaches {peak / 1e9:.0f} GFLOP/s")
            print(f"{'impl':>13} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
            for name, ts in times.items():
                seconds = statistics.median(ts)
                rate = tokens / seconds
                results[(dtype_name, name)] = rate
                print(f"{name:>13} {seconds * 1e3:8.0f} {rate:9.0f} {rate * flops / 1e9:8.1f} {rate * flops / peak:6.1%}")
            print(f"{'speedup':>13} {results[(dtype_name, 'nanoseek')] / results[(dtype_name, 'transformers')]:8.2f}x")
    if {("fp32", "nanoseek"), ("bf16", "nanoseek")} <= results.keys():
        print(f"\nnanoseek bf16 autocast vs fp32: {results[('bf16', 'nanoseek')] / results[('fp32', 'nanoseek')]:.2f}x tokens/s")


if __name__ == "__main__":
    main()
