"""`nanoseek train-vlm`: teach a DeepSeek-V3 language model to read images, in DeepSeek-VL2's stages.

    nanoseek train-vlm --data breastmnist.npz --out runs/breast-vlm --max-minutes 20
    nanoseek train-vlm --data pairs.jsonl --init runs/text-model --out runs/vlm

Data is a MedMNIST 2D .npz (its train split is learned, its val split picks the checkpoint) or
JSONL of `{"image", "messages"}` (see vlm_data.py). The language model comes from a text-pretrained
checkpoint (`--init`, with its tokenizer; a vision tower is added) or is built from scratch (`--preset`,
with a byte-level BPE tokenizer trained on the data's text). Two stages, as DeepSeek-VL2 trains:
1. projector only (`--projector-epochs`): encoder and language model frozen, the projector learns
   to map image features into the language model's embedding space;
2. everything (`--epochs`): encoder, projector and language model together.
Only the reply tokens are learned. `--max-minutes` bounds the whole run, data preparation and
validation included. The checkpoint written to --out is the one with the best validation accuracy
(MedMNIST: generated answers on the val split), or the lowest validation loss for JSONL with
--val-data, or the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load, save
from ..config import PRESETS, get_preset
from ..model.transformer import DeepSeekModel, build_model
from ..model.vision import VisionConfig
from ..tokenizer import Tokenizer
from .balance import moe_layers, routed_counts, update_router_bias
from .optim import build_optimizer, lr_at
from .vlm_data import ClassTask, Example, make_batch, medmnist_examples, read_jsonl
from .vlm_eval import evaluate

TRAIN_INFO = "vlm_train.json"  # written beside the weights: the task, the arguments, the history


# ---- model ---------------------------------------------------------------------------------------
def vision_config(args) -> dict:
    width = args.vision_width
    return VisionConfig(
        image_size=args.image_size, patch_size=args.patch_size, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads, max_tiles=args.max_tiles,
    ).to_dict()


def build_vlm(args, texts: list[str]) -> tuple[DeepSeekModel, Tokenizer]:
    """A text checkpoint plus a new vision tower, a VLM checkpoint to train on, or a new model."""
    if args.init:
        tok = Tokenizer.load(args.init)
        if tok.image_id is None:
            raise SystemExit(f"{args.init}: its tokenizer has no <image> token; retrain it with nanoseek's tokenizer")
        base = load(args.init, dtype=torch.float32)
        if base.vision is not None:
            return base, tok  # continue training a vision-language model
        config = base.config.replace(vision_config=vision_config(args), image_token_id=tok.image_id)
        model = build_model(config, seed=args.seed)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("vision.") for k in missing), (missing, unexpected)
        return model, tok
    if args.tokenizer:
        tok = Tokenizer.load(args.tokenizer)
    else:
        tok = Tokenizer.train(texts, vocab_size=args.vocab_size)
    config = get_preset(args.preset).replace(
        vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
        num_nextn_predict_layers=0,  # replies are a few tokens; MTP densifies long-text pretraining
        vision_config=vision_config(args), image_token_id=tok.image_id,
    )
    return build_model(config, seed=args.seed), tok


def set_stage(model: DeepSeekModel, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1 trains the projector and the layout tokens; stage 2 trains everything."""
    for name, param in model.named_parameters():
        param.requires_grad = stage == 2 or name.startswith(("vision.projector.", "vision.image_newline", "vision.view_separator"))
    return [p for p in model.parameters() if p.requires_grad]


# ---- data ----------------------------------------------------------------------------------------
def load_data(args) -> tuple[list[Example], list[Example], ClassTask | None]:
    path = Path(args.data)
    if path.suffix == ".npz":
        train, task = medmnist_examples(path, "train")
        val, _ = medmnist_examples(path, "val")
        return train, val, task
    train = read_jsonl(path)
    val = read_jsonl(args.val_data) if args.val_data else []
    return train, val, None


def data_texts(examples: list[Example]) -> list[str]:
    texts = []
    for ex in examples:
        for m in ex.messages:
            content = m.get("content")
            parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content or [] if isinstance(p, dict)]
            texts += [p for p in parts if p]
    return texts


def epoch_order(examples: list[Example], balance: bool, generator: torch.Generator) -> list[int]:
    """A shuffled epoch; with balance, drawn with replacement so every class is equally likely."""
    n = len(examples)
    if not balance or any(ex.label is None for ex in examples):
        return torch.randperm(n, generator=generator).tolist()
    labels = torch.tensor([ex.label for ex in examples])
    weights = 1.0 / torch.bincount(labels).float()[labels]
    return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()


# ---- training ------------------------------------------------------------------------------------
def train_step(model: DeepSeekModel, batch, optimizer, lr: float, args) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    embeds = model.embed_multimodal(batch.input_ids, batch.images)
    logits = model(inputs_embeds=embeds)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100,
                           label_smoothing=args.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.grad_clip)
    optimizer.step()
    for _, moe in moe_layers(model):  # DeepSeek-V3's auxiliary-loss-free balancing
        update_router_bias(moe, routed_counts(moe), args.bias_update_rate)
    return loss.item()


def validate(model, tok, val: list[Example], task: ClassTask | None, args) -> dict:
    if not val:
        return {}
    if task is not None:
        r = evaluate(model, tok, val, task, batch_size=args.batch_size * 2)
        return {"val_accuracy": r["accuracy"], "val_auc": r["auc"], "val_loss": r["loss"]}
    model.eval()
    with torch.no_grad():
        losses = []
        for i in range(0, len(val), args.batch_size):
            batch = make_batch(val[i : i + args.batch_size], tok, VisionConfig.from_dict(model.config.vision_config))
            logits = model(inputs_embeds=model.embed_multimodal(batch.input_ids, batch.images))
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100).item())
    model.train()
    return {"val_loss": float(np.mean(losses))}


def score(metrics: dict) -> tuple:
    """Higher is better: val accuracy, then AUC to break its ties; or minus the val loss."""
    if "val_accuracy" in metrics:
        return (metrics["val_accuracy"], metrics["val_auc"])
    return (-metrics.get("val_loss", 0.0),)


def run_training(args) -> dict:
    start = time.perf_counter()
    deadline = start + 60 * args.max_minutes
    torch.manual_seed(args.seed)
    train, val, task = load_data(args)
    model, tok = build_vlm(args, data_texts(train))
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.vision.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_vision / 1e6:.2f}M vision), vocab {tok.vocab_size}; "
          f"{len(train)} train / {len(val)} val examples" + (f"; task {task.name}: {task.class_names}" if task else ""))
    info = {"args": vars(args), "task": task.__dict__ if task else None, "history": []}
    best, best_metrics = None, {}
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    model.train()
    out_of_time = False
    for stage, epochs, max_lr in ((1, args.projector_epochs, args.projector_lr), (2, args.epochs, args.lr)):
        if epochs == 0 or out_of_time:
            continue
        params = set_stage(model, stage)
        optimizer = build_optimizer(model, lr=max_lr, weight_decay=args.weight_decay)
        total = epochs * steps_per_epoch
        step = 0
        for epoch in range(epochs):
            order = epoch_order(train, args.balance, generator)
            losses = []
            for i in range(0, len(order), args.batch_size):
                batch = make_batch([train[j] for j in order[i : i + args.batch_size]], tok, vcfg,
                                   rng if args.augment else None)
                lr = lr_at(step, max_lr=max_lr, total_steps=total, warmup_steps=min(args.warmup_steps, total // 10 + 1))
                losses.append(train_step(model, batch, optimizer, lr, args))
                step += 1
                if time.perf_counter() > deadline:
                    out_of_time = True
                    break
            metrics = {"stage": stage, "epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
                       **validate(model, tok, val, task, args), "minutes": (time.perf_counter() - start) / 60}
            info["history"].append(metrics)
            improved = best is None or score(metrics) > score(best_metrics)
            shown = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(shown + ("  *" if improved else ""), flush=True)
            # projector-only epochs are never kept over a model that has also trained the rest
            if improved or stage > best_metrics.get("stage", 0):
                best, best_metrics = {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics
                info["best"] = best_metrics
            if out_of_time:
                print(f"stopping: the {args.max_minutes}-minute budget is spent")
                break
        del params, optimizer
    model.load_state_dict(best)
    info["minutes"] = (time.perf_counter() - start) / 60
    save(model, args.out, extra_files={**tok.files(), TRAIN_INFO: json.dumps(info, indent=2, default=str) + "\n"})
    print(f"saved the checkpoint of stage {best_metrics['stage']} epoch {best_metrics['epoch']} to {args.out} "
          f"({info['minutes']:.1f} minutes in all)")
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a MedMNIST 2D .npz, or JSONL of {image, messages}")
    parser.add_argument("--val-data", help="JSONL validation set (a .npz brings its own val split)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write")
    parser.add_argument("--init", help="start from this checkpoint (a text model gets a new vision tower)")
    parser.add_argument("--preset", default="test", choices=sorted(k for k in PRESETS if not k.startswith("deepseek")),
                        help="language model size when starting from scratch")
    parser.add_argument("--tokenizer", help="tokenizer folder to use from scratch (default: train one on the data)")
    parser.add_argument("--vocab-size", type=int, default=512, help="size of the tokenizer trained on the data")
    g = parser.add_argument_group("vision tower (new towers only)")
    g.add_argument("--image-size", type=int, default=28)
    g.add_argument("--patch-size", type=int, default=2)
    g.add_argument("--vision-width", type=int, default=128)
    g.add_argument("--vision-layers", type=int, default=4)
    g.add_argument("--vision-heads", type=int, default=4)
    g.add_argument("--max-tiles", type=int, default=1, help="dynamic tiling up to this many tiles (1: global view only)")
    g = parser.add_argument_group("training")
    g.add_argument("--projector-epochs", type=int, default=1, help="stage 1: projector only")
    g.add_argument("--epochs", type=int, default=30, help="stage 2: everything")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--projector-lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=50)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--bias-update-rate", type=float, default=1e-3, help="router bias step (DeepSeek-V3's gamma)")
    g.add_argument("--no-balance", dest="balance", action="store_false", help="sample uniformly, not class-balanced")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--max-minutes", type=float, default=20.0, help="bound on the whole run's wall time")
    g.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    run_training(args)
    return 0
