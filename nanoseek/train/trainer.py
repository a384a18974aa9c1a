"""The training step and loop shared by pretraining and SFT.

One optimizer step: for each of grad_accum micro-batches, forward (under bf16 autocast if asked),
next-token loss + lambda * mean MTP loss over depths 1..D + alpha * sequence-wise balance loss,
backward; then clip, AdamW step, and the auxiliary-loss-free router-bias update from the step's
expert loads. Losses are means over the target tokens of the whole step (targets of -100 are
ignored: SFT masks everything but the assistant's tokens that way).

The loop logs to a tqdm bar and metrics.jsonl, evaluates, checkpoints, and resumes exactly: the
weights, AdamW moments, step (hence learning rate), data position and RNG all come back, so a
resumed run computes the same losses bit for bit on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..model.transformer import DeepSeekModel
from ..tokenizer import Tokenizer
from . import balance
from .checkpoint import load_checkpoint, save_checkpoint
from .loss import IGNORE, cross_entropy_sum
from .metrics import MetricsLog, measure_matmul_flops, pick_dtype, plot_run, train_flops_per_token
from .optim import SCHEDULES, build_optimizer, lr_at

DTYPES = ("auto", "fp32", "bf16")


@dataclass
class Settings:
    """Every knob of a run; saved in checkpoints, so `--resume` needs nothing else."""

    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    steps: int | None = None  # total optimizer steps; None: set by the time budget
    minutes: float | None = None  # time budget; the step count is fixed after a short probe
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "wsd"
    decay_frac: float = 0.2  # WSD: fraction of steps in the final decay
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_depth: int = 1  # D; at most the model's num_nextn_predict_layers
    mtp_lambda: float = 0.3  # DeepSeek-V3: 0.3, then 0.1 for the last stretch
    bias_gamma: float = 1e-3  # DeepSeek-V3: 0.001; 0 turns the bias update off
    balance_alpha: float = 1e-4  # DeepSeek-V3: 0.0001
    dtype: str = "auto"  # "fp32", "bf16" (autocast; weights and optimizer stay fp32), "auto": the faster here
    activation_checkpointing: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    save_every: int = 0  # 0: only at the end
    keep: int = 2
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: dict) -> "Settings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def validate(self, mtp_modules: int | None = None, context: int | None = None) -> None:
        """Raise ConfigError naming the flag of the first impossible setting. The commands call this
        before any work: a bad value otherwise surfaces as a crash minutes into a run (after the
        tokenizer and shards are built, or at the end of warmup), or as a run that trains nothing.
        mtp_modules: the model's num_nextn_predict_layers, context its max_position_embeddings, when known."""
        def fail(name: str, why: str):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

        def number(name: str) -> bool:
            value = getattr(self, name)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("batch_size", "seq_len", "grad_accum", "log_every", "eval_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                fail(name, "must be a whole number >= 1")
        for name in ("warmup_steps", "mtp_depth", "eval_every", "save_every", "keep"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(name, "must be a whole number >= 0")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            fail("steps", "must be a whole number >= 1")
        if self.minutes is not None and not (number("minutes") and self.minutes > 0):
            fail("minutes", "must be a positive number")
        if self.steps is None and self.minutes is None:
            raise ConfigError("give --steps or --minutes: nothing else ends the run")
        if not (number("lr") and self.lr > 0):
            fail("lr", "must be a positive number")
        for name in ("weight_decay", "grad_clip", "mtp_lambda", "bias_gamma", "balance_alpha"):
            if not (number(name) and getattr(self, name) >= 0):
                fail(name, "must be a number >= 0")
        for name in ("min_lr_ratio", "decay_frac"):
            if not (number(name) and 0 <= getattr(self, name) <= 1):
                fail(name, "must be a number from 0 to 1")
        if self.schedule not in SCHEDULES:
            fail("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            fail("dtype", f"must be one of {', '.join(DTYPES)}")
        if mtp_modules is not None and self.mtp_depth > mtp_modules:
            fail("mtp_depth", f"the model has {mtp_modules} MTP module(s) (num_nextn_predict_layers)")
        # MTP depth k predicts the token k+1 ahead: a window of k tokens or fewer has none to predict
        # (its module would run on an empty sequence and crash). Checked once the depth is final:
        # sft caps it to the model's modules after its first, model-less check.
        if mtp_modules is not None and self.mtp_depth and self.seq_len <= self.mtp_depth:
            fail("seq_len", f"must be longer than --mtp-depth {self.mtp_depth} (the MTP modules predict up to "
                            f"{self.mtp_depth + 1} tokens ahead)")
        if context is not None and self.seq_len > context:  # positions past it were never meant to be seen
            fail("seq_len", f"longer than the model's context ({context} positions, max_position_embeddings)")


def unpadded(inputs_BT: torch.Tensor, pad_id: int) -> torch.Tensor | None:
    """(B, T) bool, True before each row's trailing run of pad_id; None when no row ends in one.
    Only the trailing run: a tokenizer whose pad token is its end-of-sentence token (DeepSeek's
    are) also has that token inside the text. (Such a row's own last end-of-sentence then counts
    as padding: one token of balancing statistics.)"""
    pad_BT = inputs_BT == pad_id
    if not bool(pad_BT[:, -1].any()):
        return None
    T = inputs_BT.shape[1]
    positions_T = torch.arange(1, T + 1, device=inputs_BT.device)
    length_B = ((~pad_BT) * positions_T).amax(dim=1)  # 1 + the last position that is not padding
    return positions_T - 1 < length_B.unsqueeze(1)


class Loader(Protocol):
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def enable_activation_checkpointing(model: DeepSeekModel) -> None:
    """Recompute each block's activations in backward instead of storing them (memory for time)."""
    for block in [*model.model.layers, *model.mtp]:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


class Trainer:
    def __init__(self, model: DeepSeekModel, settings: Settings, tokenizer: Tokenizer, loader: Loader,
                 val: list[tuple[torch.Tensor, torch.Tensor]], run_dir: str | Path, extra_state: dict | None = None):
        self.model, self.s, self.tokenizer, self.loader, self.val = model, settings, tokenizer, loader, val
        self.run_dir = Path(run_dir)
        self.extra_state = extra_state or {}  # what the command needs to rebuild data and model on resume
        settings.validate(mtp_modules=len(model.mtp), context=model.config.max_position_embeddings)
        settings.dtype = pick_dtype(settings.dtype, model.device)
        self.optimizer = build_optimizer(model, settings.lr, settings.weight_decay)
        self.moes = balance.moe_layers(model)
        self.step = 0
        self.total_steps = settings.steps
        self.elapsed = 0.0  # training seconds before this process (resumed runs)
        self.history: dict = {"best_val_loss": None}
        self.window = self._fresh_window()  # the steps since the last metrics row
        if settings.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.flops_per_token = train_flops_per_token(model.config, settings.seq_len, settings.mtp_depth)
        self.peak_flops = None

    @property
    def autocast(self):
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.s.dtype == "bf16")

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self) -> dict:
        s, model = self.s, self.model
        model.train()
        lr = lr_at(self.step, max_lr=s.lr, total_steps=self.total_steps or 10**9, warmup_steps=s.warmup_steps,
                   schedule=s.schedule, min_lr_ratio=s.min_lr_ratio, decay_frac=s.decay_frac)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = model.device
        batches = [tuple(t.to(device, non_blocking=True) for t in self.loader.next_batch()) for _ in range(s.grad_accum)]
        # normalise by the step's target count so every target token weighs the same
        n_targets = sum(int((t != IGNORE).sum()) for _, t in batches)
        n_mtp = [sum(int((t[:, k:] != IGNORE).sum()) for _, t in batches) for k in range(1, s.mtp_depth + 1)]
        counts = [torch.zeros(moe.gate.n_experts, dtype=torch.long, device=device) for _, moe in self.moes]
        # A loader that pads rows (SFT's) says with what; packed pretraining windows have no padding.
        pad_id = getattr(self.loader, "pad_id", None)
        loss_sum = mtp_sum = bal_sum = 0.0
        for inputs, targets in batches:
            # padding must not count as expert load (all of it routes alike, so it would push the
            # bias and the balance loss the wrong way)
            real = None if pad_id is None else unpadded(inputs, pad_id)
            with self.autocast:
                logits, hidden = model(inputs, return_hidden=True)
                loss = cross_entropy_sum(logits, targets) / max(1, n_targets)
                total = loss
                if s.mtp_depth:
                    mtp_logits = model.mtp_forward(hidden, inputs, s.mtp_depth)
                    mtp = sum(cross_entropy_sum(l, targets[:, k:]) / max(1, n_mtp[k - 1])
                              for k, l in enumerate(mtp_logits, 1)) / s.mtp_depth
                    total = total + s.mtp_lambda * mtp
                    mtp_sum += float(mtp.detach())
                active = [(i, moe) for i, (_, moe) in enumerate(self.moes) if moe.last_topk_idx is not None]
                if s.balance_alpha and active:
                    bal = sum(balance.sequence_balance_loss(moe, inputs.shape[0], balance.token_mask(moe, real))
                              for _, moe in active) / s.grad_accum
                    total = total + s.balance_alpha * bal
                    bal_sum += float(bal.detach())
            total.backward()
            loss_sum += float(loss.detach())
            for i, moe in active:
                counts[i] += balance.routed_counts(moe, balance.token_mask(moe, real))
                moe.last_topk_idx = moe.last_scores = None  # release the graph; also marks "not run"
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip) if s.grad_clip else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for (_, moe), c in zip(self.moes, counts):
            balance.update_router_bias(moe, c, s.bias_gamma)
        self.step += 1
        return {
            "loss": loss_sum,
            "mtp_loss": mtp_sum if s.mtp_depth else None,
            "balance_loss": bal_sum if s.balance_alpha and self.moes else None,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": lr,
            "tokens": sum(t.numel() for t, _ in batches),
            "expert_counts": [c.cpu() for c in counts],
        }

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean val loss; with MTP, its loss at depth 1 and how often its guess for token i+2 equals
        the main model's (the draft acceptance of greedy self-speculative decoding on this text)."""
        model, s = self.model, self.s
        model.eval()
        loss = mtp = n = n_mtp = agree = 0.0
        for inputs, targets in self.val:
            inputs, targets = inputs.to(model.device), targets.to(model.device)
            with self.autocast:
                logits, hidden = model(inputs, return_hidden=True)
                loss += float(cross_entropy_sum(logits, targets))
                n += int((targets != IGNORE).sum())
                if s.mtp_depth:
                    (draft,) = model.mtp_forward(hidden, inputs, 1)
                    mtp += float(cross_entropy_sum(draft, targets[:, 1:]))
                    scored = targets[:, 1:] != IGNORE  # as the loss: not padding, not SFT prompts
                    n_mtp += int(scored.sum())
                    agree += int(((draft.argmax(-1) == logits[:, 1:].argmax(-1)) & scored).sum())
        for _, moe in self.moes:
            moe.last_topk_idx = moe.last_scores = None
        out = {"val_loss": loss / max(1, n)}
        if s.mtp_depth:
            out["val_mtp_loss"] = mtp / max(1, n_mtp)
            out["val_mtp_agree"] = agree / max(1, n_mtp)
        return out

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self) -> Path:
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "elapsed": self.elapsed_now(),
            "settings": dataclasses.asdict(self.s),
            "loader": self.loader.state_dict(),
            "history": self.history,
            # the losses and loads the next metrics row averages: resumed, it averages the same steps
            "window": {"loss": self.window["loss"], "mtp": self.window["mtp"],
                       "counts": None if self.window["counts"] is None else self.window["counts"].tolist()},
            **self.extra_state,
        }
        tensors = {"optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.model.device.type == "cuda":
            tensors["cuda_rng"] = torch.cuda.get_rng_state(self.model.device)
        return save_checkpoint(self.run_dir, self.model, self.tokenizer, state, tensors, keep=self.s.keep)

    def load(self, path: str | Path) -> dict:
        state, tensors = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(tensors["optimizer"])
        torch.set_rng_state(tensors["torch_rng"])
        if "cuda_rng" in tensors and self.model.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["cuda_rng"], self.model.device)
        self.loader.load_state_dict(state["loader"])
        self.step, self.total_steps = state["step"], state["total_steps"]
        self.elapsed, self.history = state["elapsed"], state["history"]
        self.window = self._fresh_window()
        saved = state.get("window")  # absent from older checkpoints
        if saved:
            counts = saved["counts"]
            self.window.update(loss=saved["loss"], mtp=saved["mtp"],
                               counts=None if counts is None else torch.tensor(counts, dtype=torch.long))
        return state

    @staticmethod
    def _fresh_window() -> dict:
        # tokens and seconds restart with each process: a pace spanning a kill would mean nothing
        return {"tokens": 0, "seconds": 0.0, "counts": None, "loss": [], "mtp": []}

    def elapsed_now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._started if hasattr(self, "_started") else 0.0)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, resumed: bool = False) -> dict:
        s = self.s
        self.peak_flops = measure_matmul_flops(torch.bfloat16 if s.dtype == "bf16" else torch.float32, self.model.device)
        log = MetricsLog(self.run_dir, resume_step=self.step if resumed else None)
        self._started = time.perf_counter()
        self._first_step = self.step  # a resumed run's earlier steps took none of this process's time
        probe_steps = 10
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True, desc="train")
        last_val: dict = {}
        while self.total_steps is None or self.step < self.total_steps:
            start = time.perf_counter()
            stats = self.train_step()
            seconds = time.perf_counter() - start
            window = self.window
            window["tokens"] += stats["tokens"]
            window["seconds"] += seconds
            window["loss"].append(stats["loss"])
            if stats["mtp_loss"] is not None:
                window["mtp"].append(stats["mtp_loss"])
            counts = torch.stack(stats["expert_counts"]) if self.moes else None
            window["counts"] = counts if window["counts"] is None else window["counts"] + counts
            if self.total_steps is None and self.step - self._first_step >= probe_steps:
                self.total_steps = self._steps_for_budget()
                bar.reset(total=self.total_steps)
                bar.update(self.step - 1)  # the step just taken is counted below
            last = self.total_steps is not None and self.step >= self.total_steps
            row = {"step": self.step, "loss": stats["loss"]}
            if self.step % s.log_every == 0 or last:
                row.update(self._interval_metrics(stats, window))
                self.window = self._fresh_window()
            if s.eval_every and (self.step % s.eval_every == 0 or last) and self.val:
                last_val = self.evaluate()
                row.update(last_val)
                best = self.history.get("best_val_loss")
                self.history["best_val_loss"] = last_val["val_loss"] if best is None else min(best, last_val["val_loss"])
            if len(row) > 2 or s.log_every == 1:
                row.setdefault("elapsed", self.elapsed_now())
                log.log(row)
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in [("loss", stats["loss"]), ("val", last_val.get("val_loss")),
                             ("tok/s", row.get("tokens_per_s")), ("mfu", row.get("mfu"))] if v is not None}, refresh=False)
            if last or (s.save_every and self.step % s.save_every == 0):
                try:
                    self.save()
                except CheckpointError:
                    bar.close()  # so that the command's one-line error starts a line of its own
                    raise
        bar.close()
        log.close()
        plot_run(log.path, self.run_dir / "train_plot.png", title=self.run_dir.name)
        return {"step": self.step, **last_val, "elapsed": self.elapsed_now()}

    def _interval_metrics(self, stats: dict, window: dict) -> dict:
        tokens_per_s = window["tokens"] / max(window["seconds"], 1e-9)
        row = {
            "loss_avg": sum(window["loss"]) / len(window["loss"]),
            "lr": stats["lr"],
            "grad_norm": stats["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak_flops,
            "elapsed": self.elapsed_now(),
        }
        if window["mtp"]:
            row["mtp_loss"] = sum(window["mtp"]) / len(window["mtp"])
        if stats["balance_loss"] is not None:
            row["balance_loss"] = stats["balance_loss"]
        if window["counts"] is not None:
            counts = window["counts"]
            row["moe_layers"] = [i for i, _ in self.moes]
            row["load_max_over_mean"] = [balance.load_imbalance(c) for c in counts]
            row["expert_load"] = (counts.float() / counts.sum(dim=1, keepdim=True).clamp_min(1)).tolist()
        return row

    def _steps_for_budget(self) -> int:
        """Total steps that fit the time budget, from the probe steps' pace and one timed evaluation."""
        s = self.s
        spent = time.perf_counter() - self._started
        per_step = spent / max(1, self.step - self._first_step)
        eval_start = time.perf_counter()
        if self.val and s.eval_every:
            self.evaluate()
        per_step += (time.perf_counter() - eval_start) / s.eval_every if s.eval_every else 0.0
        remaining = s.minutes * 60 - self.elapsed - (time.perf_counter() - self._started)
        return max(self.step + 1, self.step + math.floor(remaining / per_step))
