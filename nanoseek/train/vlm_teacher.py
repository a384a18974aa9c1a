"""A small convolutional teacher for `train-vlm --distill`: trained first, then distilled into the VLM.

DeiT (Touvron et al., 2021) trains ViTs without pretraining data by distilling a convnet: the
convnet's built-in locality, which a ViT lacks on small data, reaches the ViT through the teacher's
answers. Here the teacher is a classifier of the data's class labels trained on the same augmented
views the VLM sees; distillation is DeiT's hard form: beside its own reply, the VLM learns the reply
naming the class the teacher picks for the same augmented view. The teacher lives only while
training: the checkpoint holds the VLM alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..model.vision import VisionConfig, conv_bn_relu
from .vlm_data import Batch, ClassTask, Example, load_views, make_batch, padding_id


class ConvTeacher(nn.Module):
    """Three stages of two 3x3 convolutions (batch norm, ReLU), 2x2 max-pooling between them, global
    average pooling and a linear classifier: (B, C, S, S) views -> (B, n_classes) logits."""

    def __init__(self, channels: int, n_classes: int, width: int = 32):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(*conv_bn_relu(c_in, c_out), *conv_bn_relu(c_out, c_out))

        self.features = nn.Sequential(stage(channels, width), nn.MaxPool2d(2), stage(width, 2 * width), nn.MaxPool2d(2),
                                      stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, n_classes))

    def forward(self, views_BCSS: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(views_BCSS))


def global_views(batch_images) -> torch.Tensor:
    """Each image's global view (the first), stacked: (B, C, S, S)."""
    return torch.stack([im.views[0] for im in batch_images])


def train_teacher(train: list[Example], n_classes: int, vcfg: VisionConfig, *, epochs: int, batch_size: int,
                  order, rng: np.random.Generator | None, device: torch.device, lr: float = 2e-3) -> ConvTeacher:
    """Train a ConvTeacher on the examples' labels, `epochs` passes of `order()` (a list of example
    indices per epoch, as the VLM draws them), views augmented by rng (None: not augmented)."""
    teacher = ConvTeacher(vcfg.num_channels, n_classes).to(device)
    steps = epochs * (len(train) // batch_size)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps))
    start, correct, seen = time.perf_counter(), 0, 0
    teacher.train()
    for epoch in range(epochs):
        indices = order()
        for i in range(0, len(indices) - batch_size + 1, batch_size):
            chosen = [train[j] for j in indices[i : i + batch_size]]
            views = global_views([load_views(ex, vcfg, rng) for ex in chosen]).to(device)
            labels = torch.tensor([ex.label for ex in chosen], device=device)
            logits = teacher(views)
            loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if epoch == epochs - 1:
                correct += int((logits.argmax(-1) == labels).sum())
                seen += len(chosen)
    teacher.eval()
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e3:.0f}k parameters, {epochs} epochs in "
          f"{time.perf_counter() - start:.0f}s, last-epoch training accuracy {correct / max(1, seen):.3f}", flush=True)
    return teacher


@dataclass
class Distiller:
    """The trained teacher and, per class, the reply rows (ids and targets) that name it."""

    teacher: ConvTeacher
    weight: float  # of the teacher's replies in the loss; 1 - weight for the data's own
    reply_ids: list[torch.Tensor]  # per class: (T_c,) input ids of a prompt and that class's reply
    reply_targets: list[torch.Tensor]  # per class: (T_c,) targets, -100 where nothing is learned
    tiles: tuple  # the image layout the rows were made for
    pad_id: int

    @classmethod
    def build(cls, teacher: ConvTeacher, weight: float, task: ClassTask, example: Example, tok, vcfg: VisionConfig,
              device: torch.device) -> "Distiller":
        ids, targets, tiles = [], [], None
        for label in range(len(task.class_names)):
            batch = make_batch([Example(example.image, task.messages(label), label)], tok, vcfg)
            ids.append(batch.input_ids[0].to(device))
            targets.append(batch.targets[0].to(device))
            tiles = tuple(batch.images[0].tiles)
        return cls(teacher, weight, ids, targets, tiles, padding_id(tok))

    def teacher_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, T) ids and targets of the replies the teacher gives for the batch's views, or None when
        an image's layout differs from the one the rows were made for (tiling)."""
        if any(tuple(im.tiles) != self.tiles for im in batch.images):
            return None
        with torch.no_grad():
            picked = self.teacher(global_views(batch.images)).argmax(-1).tolist()
        T = max(len(self.reply_ids[c]) for c in picked)
        ids = torch.full((len(picked), T), self.pad_id, dtype=torch.long, device=batch.input_ids.device)
        targets = torch.full_like(ids, -100)
        for row, c in enumerate(picked):
            ids[row, : len(self.reply_ids[c])] = self.reply_ids[c]
            targets[row, : len(self.reply_targets[c])] = self.reply_targets[c]
        return ids, targets
