"""Training metrics: model FLOPs and MFU, metrics.jsonl (+ TensorBoard if installed), the end-of-run plot.

MFU is the model's useful matmul work per second over this machine's own matmul throughput,
measured in the same process (`measure_matmul_flops`), so it says how much of what the hardware
can actually do goes into the model.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..config import ModelConfig


def _attention_matmul_params(cfg: ModelConfig) -> int:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else cfg.q_lora_rank * (D + H * cfg.qk_head_dim)
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * D


def _ffn_matmul_params(cfg: ModelConfig, layer_idx: int) -> int:
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer_idx):
        return 3 * D * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.n_shared_experts  # the ones a token actually runs
    return experts * 3 * D * cfg.moe_intermediate_size + cfg.n_routed_experts * D  # + router


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Matmul FLOPs of one token's forward pass: 2 per activated weight, plus causal attention
    (a token attends to (T+1)/2 positions on average; masked-out work is not counted)."""
    attn_per_layer = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * (seq_len + 1) / 2
    flops = 0.0
    for i in range(cfg.num_hidden_layers + mtp_depth):
        flops += 2 * (_attention_matmul_params(cfg) + _ffn_matmul_params(cfg, i)) + attn_per_layer
    D, V = cfg.hidden_size, cfg.vocab_size
    flops += 2 * D * V * (1 + mtp_depth)  # output head, shared by the MTP modules
    flops += 2 * (2 * D * D) * mtp_depth  # MTP eh_proj
    return flops


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp_depth: int = 0) -> float:
    """Forward + backward (twice the forward: gradients for activations and for weights)."""
    return 3 * forward_flops_per_token(cfg, seq_len, mtp_depth)


def measure_matmul_flops(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                         size: int | None = None, seconds: float = 0.5) -> float:
    """This machine's dense matmul throughput in FLOP/s, best of repeated size^3 products
    (1024 on CPU; 8192 on a GPU, which a smaller product leaves mostly idle)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    size = size or (8192 if gpu else 1024)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    a @ b  # warm-up
    sync()
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def pick_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """'auto' -> 'bf16' where this device multiplies bf16 matrices clearly faster than fp32 (a CPU
    with native bf16 instructions, any recent GPU), else 'fp32' (without them bf16 is emulated and
    several times slower)."""
    if name != "auto":
        return name
    fp32 = measure_matmul_flops(torch.float32, device, seconds=0.3)
    bf16 = measure_matmul_flops(torch.bfloat16, device, seconds=0.3)
    return "bf16" if bf16 > 1.2 * fp32 else "fp32"


class MetricsLog:
    """metrics.jsonl, one JSON object per logged step; TensorBoard scalars when tensorboard is installed.

    Resuming at step S keeps the lines with step <= S and drops the rest, which a killed run may
    have written after its last checkpoint; a fresh run starts both logs empty.
    """

    def __init__(self, folder: str | Path, resume_step: int | None = None):
        self.path = Path(folder) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if row.get("step", math.inf) <= resume_step:
                    kept.append(line)
        # rewritten beside and renamed over: a kill (or a full disk) midway keeps the old lines
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides every event at or after purge_step: a resumed run's first step is
            # resume_step + 1 (the checkpoint's own step stays, as in metrics.jsonl), and a fresh one
            # hides what an earlier run in this folder, killed before any checkpoint, logged
            purge_step = (resume_step or 0) + 1
            self.tensorboard = SummaryWriter(str(Path(folder) / "tensorboard"), purge_step=purge_step)
        except ImportError:
            pass

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Loss curves, per-layer load imbalance over time, and a layers x experts heatmap of the final load."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    loads = [r for r in rows if r.get("expert_load")]
    fig, axes = plt.subplots(1, 3 if loads else 1, figsize=(17 if loads else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    for key, label in (("loss", "train loss"), ("val_loss", "val loss"), ("mtp_loss", "MTP loss (depth 1..D, mean)")):
        points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if loads:
        layers = loads[-1]["moe_layers"]
        ax = axes[0][1]
        for j, layer in enumerate(layers):
            ax.plot([r["step"] for r in loads], [r["load_max_over_mean"][j] for r in loads], label=f"layer {layer}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean expert load")
        ax.set_title("expert load imbalance (1 = balanced)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax = axes[0][2]
        heat = torch.tensor(loads[-1]["expert_load"], dtype=torch.float32)
        heat = heat / heat.mean(dim=1, keepdim=True)
        image = ax.imshow(heat.numpy(), aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
        ax.set_xlabel("routed expert")
        ax.set_title(f"expert load / mean, steps up to {loads[-1]['step']}")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
