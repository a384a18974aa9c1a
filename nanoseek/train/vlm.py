"""`nanoseek train-vlm`: teach a DeepSeek-V3 language model to read images, in DeepSeek-VL2's stages.

    nanoseek train-vlm --data breastmnist.npz --out runs/breast-vlm --max-minutes 20
    nanoseek train-vlm --data pairs.jsonl --init runs/text-model --out runs/vlm

Data is a MedMNIST 2D .npz (its train split is learned, its val split picks the checkpoint) or
JSONL of `{"image", "messages"}` (see vlm_data.py). The language model comes from a text-pretrained
checkpoint (`--init`, with its tokenizer; a vision tower is added) or is built from scratch (`--preset`,
with a byte-level BPE tokenizer trained on the data's text). Two stages, as DeepSeek-VL2 trains:
1. projector only (`--projector-steps`): encoder and language model frozen, the projector learns
   to map image features into the language model's embedding space;
2. everything (`--steps`): encoder, projector and language model together.
Only the reply tokens are learned. `--max-minutes` bounds the whole run, data preparation and
validation included. The checkpoint written to --out is the one with the best validation accuracy
(MedMNIST: generated answers on the val split), or the lowest validation loss for JSONL with
--val-data, or, without validation data, the last one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import load, save
from ..config import PRESETS, ConfigError, get_preset, read_config_json
from ..model.transformer import DeepSeekModel, build_model
from ..model.vision import VisionConfig, merge_image_embeds
from ..runtime import pick_device, set_threads
from ..tokenizer import Tokenizer
from .balance import moe_layers, routed_counts, token_mask, update_router_bias
from .optim import build_optimizer, lr_at
from .checkpoint import report_user_errors
from .vlm_data import ClassTask, Example, VLMDataError, make_batch, medmnist_examples, read_jsonl
from .trainer import unpadded
from .vlm_eval import evaluate
from .vlm_teacher import Distiller, train_teacher

TRAIN_INFO = "vlm_train.json"  # written beside the weights: the task, the arguments, the history


# ---- model ---------------------------------------------------------------------------------------
def vision_config(args) -> dict:
    width = args.vision_width
    return VisionConfig(
        image_size=args.image_size, patch_size=args.patch_size, stem_channels=args.conv_stem,
        patch_overlap=(0 if args.conv_stem else 2) if args.patch_overlap is None else args.patch_overlap,
        hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads, max_tiles=args.max_tiles,
    ).to_dict()


def build_vlm(args, texts: list[str]) -> tuple[DeepSeekModel, Tokenizer]:
    """A text checkpoint plus a new vision tower, a VLM checkpoint to train on, or a new model."""
    if args.init:
        tok = Tokenizer.load(args.init)
        if tok.image_id is None:
            raise VLMDataError(f"{args.init}: its tokenizer has no <image> token; retrain it with nanoseek's tokenizer")
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


def train_mode(model: DeepSeekModel, stage: int) -> None:
    """Training mode, except that a frozen stem's batch norms keep their running statistics in stage 1
    (they would otherwise drift on the projector-only steps, which must leave the encoder as it was)."""
    model.train()
    if stage == 1:
        for module in model.vision.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()


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


def class_weights(train: list[Example], val: list[Example], balance: str) -> torch.Tensor | None:
    """Per-example sampling weights, or None for plain shuffling.

    "classes": every class equally often. "val": classes as often as in the validation split, so the
    model's prior (and so its answers) fits the data it is selected on and will be tested on, when a
    training split was gathered differently (PneumoniaMNIST's variant keeps 10% normal images in
    train against 26% in val). "none", or data without labels: the training split as it is.
    """
    if balance == "none" or any(ex.label is None for ex in train):
        return None
    labels = torch.tensor([ex.label for ex in train])
    counts = torch.bincount(labels).float()
    if balance == "classes":
        target = (counts > 0).float()
    else:
        if not val or any(ex.label is None for ex in val):
            return None
        target = torch.bincount(torch.tensor([ex.label for ex in val]), minlength=len(counts)).float()[: len(counts)]
    return (target / counts.clamp_min(1))[labels]


def epoch_order(n: int, weights: torch.Tensor | None, generator: torch.Generator) -> list[int]:
    """A shuffled epoch, or n draws with replacement in proportion to weights."""
    if weights is None:
        return torch.randperm(n, generator=generator).tolist()
    return torch.multinomial(weights, n, replacement=True, generator=generator).tolist()


# ---- training ------------------------------------------------------------------------------------
def reply_loss(logits, targets, args) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=args.label_smoothing)


def mixup_loss(model: DeepSeekModel, batch, args, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mixup (Zhang et al., 2018) for answers in words: each image becomes lam * itself + (1 - lam) *
    another image of the batch, and the loss is lam * the loss of its own reply + (1 - lam) * the
    loss of the other's reply, both read after the same mixed image (one vision pass; the language
    model sees the batch twice, once with each reply). Returns the loss and the (2B, T) ids the
    language model read; None when the images differ in layout (tiling)."""
    # the views' shape is not enough: grids of 1x2 and 2x1 tiles share it but fill runs of different
    # lengths, so a row would receive another image's run
    if len({(im.views.shape, tuple(im.tiles)) for im in batch.images}) != 1:
        return None
    lam = float(rng.beta(args.mixup, args.mixup))
    other = torch.from_numpy(rng.permutation(len(batch.images))).to(batch.input_ids.device)
    views = torch.stack([im.views for im in batch.images])  # (B, views, C, S, S)
    mixed = lam * views + (1 - lam) * views[other]
    images = [type(im)(v, im.tiles) for im, v in zip(batch.images, mixed)]
    own_logits, other_logits, both_ids = two_replies(model, model.vision(images), batch.input_ids, batch.input_ids[other])
    loss = lam * reply_loss(own_logits, batch.targets, args) + (1 - lam) * reply_loss(other_logits, batch.targets[other], args)
    return loss, both_ids


def two_replies(model: DeepSeekModel, image_embeds: torch.Tensor, first_ids: torch.Tensor,
                second_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The language model over two (B, T) sets of reply rows after one vision pass: row i of each
    set reads image i. -> logits of the first set, of the second, and the (2B, T) ids read."""
    both_ids = torch.cat([first_ids, second_ids])
    embeds = merge_image_embeds(model.embed(both_ids), both_ids == model.config.image_token_id,
                                torch.cat([image_embeds, image_embeds]))
    first_logits, second_logits = model(inputs_embeds=embeds).chunk(2)
    return first_logits, second_logits, both_ids


def distill_loss(model: DeepSeekModel, batch, distiller: Distiller, args) -> tuple[torch.Tensor, torch.Tensor] | None:
    """DeiT's hard distillation for answers in words: (1 - w) * the loss of each image's own reply +
    w * the loss of the reply naming the class the teacher picks for the same augmented view, both
    read after one vision pass. Returns the loss and the (2B, T) ids the language model read; None
    when an image's layout differs from the teacher rows' (tiling)."""
    rows = distiller.teacher_rows(batch)
    if rows is None:
        return None
    taught_ids, taught_targets = rows
    T = max(batch.input_ids.shape[1], taught_ids.shape[1])
    own_ids, own_targets, taught_ids, taught_targets = (
        F.pad(t, (0, T - t.shape[1]), value=fill) for t, fill in ((batch.input_ids, distiller.pad_id), (batch.targets, -100),
                                                                  (taught_ids, distiller.pad_id), (taught_targets, -100)))
    own_logits, taught_logits, both_ids = two_replies(model, model.vision(batch.images), own_ids, taught_ids)
    w = distiller.weight
    return (1 - w) * reply_loss(own_logits, own_targets, args) + w * reply_loss(taught_logits, taught_targets, args), both_ids


def batch_loss(model: DeepSeekModel, batch, args, rng: np.random.Generator,
               distiller: Distiller | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's reply loss (mixup's or distillation's when on) and the (B or 2B, T) ids the
    language model read."""
    mixed = mixup_loss(model, batch, args, rng) if args.mixup > 0 else None
    if mixed is None and distiller is not None:
        mixed = distill_loss(model, batch, distiller, args)
    if mixed is None:
        logits = model(inputs_embeds=model.embed_multimodal(batch.input_ids, batch.images))
        return reply_loss(logits, batch.targets, args), batch.input_ids
    return mixed


def train_step(model: DeepSeekModel, batch, optimizer, lr: float, args, rng: np.random.Generator,
               distiller: Distiller | None = None) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # the draws of this pass (mixup's, drop-path's), for SAM's second pass to repeat
    states = (rng.bit_generator.state, torch_rng_states(model.device)) if args.sam > 0 else None
    loss, ids = batch_loss(model, batch, args, rng, distiller)
    # replies differ in length, so rows end in padding, which must not count as expert load
    real = unpadded(ids, pad_id) if (pad_id := model.config.pad_token_id) is not None else None
    # counted now, on this pass's routing: SAM's second pass routes at perturbed weights
    # (an MTP module's MoE, from a text model given to --init, never runs here)
    counts = [(moe, routed_counts(moe, token_mask(moe, real))) for _, moe in moe_layers(model)
              if moe.last_topk_idx is not None]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if args.sam > 0:
        sharpness_aware_grads(model, batch, params, args, rng, states, distiller)
    torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    for moe, expert_counts in counts:  # DeepSeek-V3's auxiliary-loss-free balancing, on the real tokens
        update_router_bias(moe, expert_counts, args.bias_update_rate)
    return loss.item()


def torch_rng_states(device: torch.device) -> tuple:
    """torch's CPU generator state, and the GPU's when the model is on one (drop-path draws there)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.random.get_rng_state(), cuda, device


def set_torch_rng_states(states: tuple) -> None:
    cpu, cuda, device = states
    torch.random.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def sharpness_aware_grads(model: DeepSeekModel, batch, params: list[torch.nn.Parameter], args,
                          rng: np.random.Generator, states: tuple, distiller: Distiller | None = None) -> None:
    """SAM (Foret et al., 2021): replace the gradients in `params` by those taken at the worst point
    within distance args.sam of the weights, w + sam * g / |g|, on the same batch with the same
    random draws (mixup's from `rng`, drop-path's from torch's generator: `states` holds both as
    they were before the first pass). Proposed for ViTs trained from scratch on little data (Chen
    et al., 2022, "When Vision Transformers Outperform ResNets without Pretraining or Strong Data
    Augmentations"); it costs a second forward and backward per step."""
    rng_state, torch_state = states
    with_grad = [p for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in with_grad]))
    scale = args.sam / (norm + 1e-12)
    with torch.no_grad():
        saved = [p.detach().clone() for p in with_grad]  # restored exactly, whatever the weights' dtype
        # a stem's batch-norm statistics count each batch once, not again at the perturbed weights
        norm_stats = [b for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for b in m.buffers()]
        saved_stats = [b.clone() for b in norm_stats]
        for p in with_grad:
            p.add_(p.grad * scale)
    for p in with_grad:
        p.grad = None
    rng.bit_generator.state = rng_state
    after_first = torch_rng_states(model.device)
    set_torch_rng_states(torch_state)
    batch_loss(model, batch, args, rng, distiller)[0].backward()
    set_torch_rng_states(after_first)  # the stream goes on as without SAM
    with torch.no_grad():
        for p, w in zip(with_grad, saved):
            p.copy_(w)
        for b, value in zip(norm_stats, saved_stats):
            b.copy_(value)


class EMA:
    """An exponential moving average of the weights, the model that is validated and kept.
    On a few hundred images the averaged weights generalise better than the last step's."""

    def __init__(self, model: DeepSeekModel, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: DeepSeekModel) -> None:
        for k, v in model.state_dict().items():
            if v.is_floating_point() and not k.endswith("e_score_correction_bias"):
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:  # router biases follow their own rule, not an average
                self.shadow[k].copy_(v)

    def swap(self, model: DeepSeekModel) -> None:
        """Exchange the model's weights and the averaged ones (call again to swap back)."""
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        self.shadow = live


def validate(model, tok, val: list[Example], task: ClassTask | None, args) -> dict:
    if not val:
        return {}
    if task is not None:
        r = evaluate(model, tok, val, task, batch_size=args.batch_size * 2, views=args.val_views, one_view_too=False)
        return {"val_accuracy": r["accuracy"], "val_auc": r["auc"], "val_loss": r["loss"]}
    model.eval()
    with torch.no_grad():
        losses = []
        for i in range(0, len(val), args.batch_size):
            batch = make_batch(val[i : i + args.batch_size], tok, VisionConfig.from_dict(model.config.vision_config)).to(model.device)
            logits = model(inputs_embeds=model.embed_multimodal(batch.input_ids, batch.images))
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten(), ignore_index=-100).item())
    model.train()
    return {"val_loss": float(np.mean(losses))}


def score(metrics: dict) -> tuple:
    """Higher is better: val accuracy, then AUC to break its ties; or minus the val loss."""
    if "val_accuracy" in metrics:
        return (metrics["val_accuracy"], metrics["val_auc"])
    return (-metrics.get("val_loss", 0.0),)


def improves(metrics: dict, best_metrics: dict) -> bool:
    """Whether an evaluation is kept over the best so far: it scores higher, or there is nothing to
    validate on (no val_* metrics), when every evaluation is kept and so the last one is saved."""
    if not best_metrics or not any(k.startswith("val_") for k in metrics):
        return True
    return score(metrics) > score(best_metrics)


def batches(train: list[Example], weights, tok: Tokenizer, vcfg: VisionConfig, args, generator, rng,
            device: torch.device) -> Iterator:
    """Endless training batches, epoch after epoch (each epoch reshuffled or redrawn by class weights)."""
    # only full batches are made, so fewer examples than a batch would loop forever making none
    if args.batch_size < 1:
        raise VLMDataError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.batch_size > len(train):
        raise VLMDataError(f"--batch-size {args.batch_size} is more than the {len(train)} training examples; "
                           "lower --batch-size or add data")
    return _batch_stream(train, weights, tok, vcfg, args, generator, rng, device)


def _batch_stream(train, weights, tok, vcfg, args, generator, rng, device) -> Iterator:
    while True:
        order = epoch_order(len(train), weights, generator)
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):  # full batches only
            batch = make_batch([train[j] for j in order[i : i + args.batch_size]], tok, vcfg, rng if args.augment else None)
            yield batch.to(device)


def make_distiller(train: list[Example], task: ClassTask | None, weights, tok: Tokenizer, vcfg: VisionConfig,
                   args, device: torch.device) -> Distiller:
    """Train the convolutional teacher (vlm_teacher.py) on the training split, with its own draws
    of examples and augmentations, so that the VLM's data stream is the same with or without it."""
    if task is None:
        raise VLMDataError("--distill needs class labels: a MedMNIST .npz (its teacher is a classifier)")
    generator = torch.Generator().manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    teacher = train_teacher(train, len(task.class_names), vcfg, epochs=args.teacher_epochs, batch_size=args.batch_size,
                            order=lambda: epoch_order(len(train), weights, generator), rng=rng if args.augment else None,
                            device=device)
    return Distiller.build(teacher, args.distill, task, train[0], tok, vcfg, device)


def new_tower(args) -> bool:
    """Whether the run builds a vision tower (the vision flags apply): not when --init holds one,
    which is trained on as it is. An unreadable --init counts as new; loading it fails later."""
    if not args.init:
        return True
    try:
        raw = read_config_json(Path(args.init) / "config.json")
    except ConfigError:
        return True
    return not isinstance(raw, dict) or raw.get("vision_config") is None


def check_settings(args) -> None:
    """Refuse training flags outside their meaning before any work (they were tracebacks from deep
    inside torch, or silently trained something else)."""
    ranges = [("--lr", args.lr, args.lr > 0, "above 0"), ("--projector-lr", args.projector_lr, args.projector_lr > 0, "above 0"),
              ("--eval-every", args.eval_every, args.eval_every >= 1, "at least 1"),
              ("--val-views", args.val_views, args.val_views >= 1, "at least 1"),
              ("--label-smoothing", args.label_smoothing, 0 <= args.label_smoothing <= 1, "between 0 and 1"),
              ("--ema", args.ema, 0 <= args.ema < 1, "at least 0 and below 1"),
              ("--mixup", args.mixup, args.mixup >= 0, "at least 0"), ("--sam", args.sam, args.sam >= 0, "at least 0"),
              ("--drop-path", args.drop_path, 0 <= args.drop_path < 1, "at least 0 and below 1"),
              ("--warmup-steps", args.warmup_steps, args.warmup_steps >= 0, "at least 0"),
              ("--grad-clip", args.grad_clip, args.grad_clip > 0, "above 0"),
              ("--weight-decay", args.weight_decay, args.weight_decay >= 0, "at least 0"),
              ("--max-minutes", args.max_minutes, args.max_minutes > 0, "above 0"),
              ("--distill", args.distill, 0 <= args.distill <= 1, "between 0 and 1"),
              ("--teacher-epochs", args.teacher_epochs, args.teacher_epochs >= 1, "at least 1")]
    for flag, value, ok, rule in ranges:
        if not ok or value != value:  # value != value: NaN
            raise VLMDataError(f"{flag} must be {rule}, got {value}")
    if args.conv_stem and new_tower(args):
        if 2 ** len(args.conv_stem) != args.patch_size:
            raise VLMDataError(
                f"--conv-stem {','.join(map(str, args.conv_stem))} makes patches of {2 ** len(args.conv_stem)} pixels "
                f"(each stage halves the image) but --patch-size is {args.patch_size}: give one channel count per "
                "halving, or --conv-stem '' for SigLIP's single patch convolution")
        if args.patch_overlap:
            raise VLMDataError("--patch-overlap applies to the single patch convolution: use it with --conv-stem ''")
    if args.distill and args.mixup:
        raise VLMDataError("--distill and --mixup each replace the reply loss: choose one")


def run_training(args) -> dict:
    start = time.perf_counter()
    deadline = start + 60 * args.max_minutes
    if args.projector_steps < 0 or args.steps < 0 or args.projector_steps + args.steps < 1:
        # no step at all would end with no model to keep (it failed loading a None state)
        raise VLMDataError(f"--projector-steps {args.projector_steps} and --steps {args.steps}: each must be at "
                           "least 0, and together at least 1")
    check_settings(args)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train, val, task = load_data(args)
    model, tok = build_vlm(args, data_texts(train))
    model.to(device)  # built or loaded on the CPU: the same initial weights on any device
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    blocks = model.vision.encoder.blocks
    for i, block in enumerate(blocks):  # stochastic depth grows linearly with depth, as DeiT trains ViTs
        block.drop_path = args.drop_path * i / max(1, len(blocks) - 1)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.vision.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({n_vision / 1e6:.2f}M vision), vocab {tok.vocab_size}; "
          f"{len(train)} train / {len(val)} val examples" + (f"; task {task.name}: {task.class_names}" if task else ""))
    info = {"args": vars(args), "task": task.__dict__ if task else None, "history": []}
    best, best_metrics = None, {}
    weights = class_weights(train, val, args.balance)
    distiller = make_distiller(train, task, weights, tok, vcfg, args, device) if args.distill else None
    stream = batches(train, weights, tok, vcfg, args, generator, rng, device)
    out_of_time = False
    for stage, total, max_lr in ((1, args.projector_steps, args.projector_lr), (2, args.steps, args.lr)):
        if total == 0 or out_of_time:
            continue
        set_stage(model, stage)
        train_mode(model, stage)
        optimizer = build_optimizer(model, lr=max_lr, weight_decay=args.weight_decay)
        ema = EMA(model, args.ema) if args.ema and stage == 2 else None
        losses = []
        for step in range(total):
            lr = lr_at(step, max_lr=max_lr, total_steps=total, warmup_steps=min(args.warmup_steps, total // 5 + 1))
            losses.append(train_step(model, next(stream), optimizer, lr, args, rng, distiller))
            if ema is not None:
                ema.update(model)
            out_of_time = time.perf_counter() > deadline
            if (step + 1) % args.eval_every and step + 1 < total and not out_of_time:
                continue
            if ema is not None:
                ema.swap(model)  # validate (and keep) the averaged weights
            metrics = {"stage": stage, "step": step + 1, "epoch": round((step + 1) * args.batch_size / len(train), 1),
                       "train_loss": float(np.mean(losses)), **validate(model, tok, val, task, args),
                       "minutes": (time.perf_counter() - start) / 60}
            train_mode(model, stage)  # validation leaves the model in plain training mode
            losses = []
            info["history"].append(metrics)
            improved = improves(metrics, best_metrics)
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
            print(shown + ("  *" if improved else ""), flush=True)
            # a projector-only model is never kept over one that has also trained the rest
            if improved or stage > best_metrics.get("stage", 0):
                best, best_metrics = {k: v.detach().clone() for k, v in model.state_dict().items()}, metrics
                info["best"] = best_metrics
            if ema is not None:
                ema.swap(model)
            if out_of_time:
                print(f"stopping: the {args.max_minutes}-minute budget is spent")
                break
    model.load_state_dict(best)
    info["minutes"] = (time.perf_counter() - start) / 60
    save(model, args.out, extra_files={**tok.files(), TRAIN_INFO: json.dumps(info, indent=2, default=str) + "\n"})
    print(f"saved the checkpoint of stage {best_metrics['stage']} step {best_metrics['step']} to {args.out} "
          f"({info['minutes']:.1f} minutes in all)")
    return info


def channel_list(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",")] if text.strip() else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated channel counts such as 32,64, got {text!r}") from None


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
    g.add_argument("--patch-size", type=int, default=4)
    g.add_argument("--conv-stem", type=channel_list, default=[32, 64], metavar="C1,C2,...",
                   help="channels of each stage of the convolutional stem that makes the patches, one stage per "
                        "halving (2**stages must equal --patch-size; default 32,64); '' for SigLIP's single "
                        "patch convolution")
    g.add_argument("--patch-overlap", type=int, default=None,
                   help="with --conv-stem '': pixels each patch sees past its cell (default 2; 0: SigLIP's)")
    g.add_argument("--vision-width", type=int, default=128)
    g.add_argument("--vision-layers", type=int, default=4)
    g.add_argument("--vision-heads", type=int, default=4)
    g.add_argument("--max-tiles", type=int, default=1, help="dynamic tiling up to this many tiles (1: global view only)")
    g = parser.add_argument_group("training")
    g.add_argument("--projector-steps", type=int, default=50, help="stage 1 (projector only) optimizer steps")
    g.add_argument("--steps", type=int, default=4000, help="stage 2 (everything) optimizer steps")
    g.add_argument("--eval-every", type=int, default=100, help="validate (and maybe keep the model) every N steps")
    g.add_argument("--val-views", type=int, default=1, help="views of each image when validating (see eval-vlm --views)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--projector-lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--warmup-steps", type=int, default=180)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--mixup", type=float, default=0.0,
                   help="mixup of image pairs with Beta(a, a) weights, both replies learned in proportion (0: off)")
    g.add_argument("--sam", type=float, default=0.0,
                   help="sharpness-aware minimisation radius (0: off); each step then costs two passes")
    g.add_argument("--distill", type=float, default=0.0,
                   help="weight of a convolutional teacher's answers (DeiT's hard distillation; 0: off): a small "
                        "CNN is trained on the labels first, then the VLM learns its own reply and the teacher's")
    g.add_argument("--teacher-epochs", type=int, default=60, help="--distill: the teacher's passes over the training split")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the last vision block (0: off)")
    g.add_argument("--bias-update-rate", type=float, default=1e-3, help="router bias step (DeepSeek-V3's gamma)")
    g.add_argument("--balance", choices=("val", "classes", "none"), default="val",
                   help="sample classes as often as in the val split (default), equally often, or as the train split has them")
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--ema", type=float, default=0.99, help="validate and keep an average of the weights with this decay (0: off)")
    g.add_argument("--max-minutes", type=float, default=20.0, help="bound on the whole run's wall time")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")
    g.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    def body() -> None:  # run_training's summary is for Python callers, not the exit status
        run_training(args)

    return report_user_errors("train-vlm", body, (VLMDataError,))
