"""Data for `nanoseek train-vlm` and `nanoseek eval-vlm`: image+text conversations, batched for the model.

Two sources:
- JSONL, one `{"image": path | base64 | data URL, "messages": [...]}` per line (paths relative to
  the file). The user's text marks where the image goes with `<image>` (or an image content part);
  without a mark the image goes before the first user message's text, as DeepSeek-VL2's prompts do.
- Any MedMNIST 2D `.npz` (grayscale or RGB, any number of classes) as question-answer pairs: the
  question names the kind of image, the answer is the class name (`MEDMNIST`; an unknown subset
  asks "What does this image show?" and answers "class N").

A conversation becomes token ids with each `<image>` expanded to its image's run of positions,
and a target mask that is True on the assistant's reply and the end-of-sentence after it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from ..data import jsonl_lines
from ..image import ImageError, is_file, load_image, preprocess, to_mode
from ..model.vision import ImageInput, VisionConfig, image_token_count
from ..tokenizer import IMAGE, Tokenizer


class VLMDataError(ValueError):
    """A data file is missing or malformed; the message names the file, line and field."""


# subset -> (question, class names in label order). Names are MedMNIST v2's labels, written as answers.
_ORGANS = ["bladder", "left femur", "right femur", "heart", "left kidney", "right kidney", "liver",
           "left lung", "right lung", "pancreas", "spleen"]
MEDMNIST: dict[str, tuple[str, list[str]]] = {
    "breastmnist": ("What does this breast ultrasound show?", ["malignant", "normal or benign"]),
    "pneumoniamnist": ("What does this chest X-ray show?", ["normal", "pneumonia"]),
    "pathmnist": ("What tissue does this colon pathology slide show?", [
        "adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
        "cancer-associated stroma", "colorectal adenocarcinoma epithelium"]),
    "dermamnist": ("What skin lesion does this dermatoscope image show?", [
        "actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis-like lesions",
        "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"]),
    "octmnist": ("What does this retinal OCT scan show?", [
        "choroidal neovascularization", "diabetic macular edema", "drusen", "normal"]),
    "retinamnist": ("What diabetic retinopathy grade does this fundus photograph show?", [
        "grade 0", "grade 1", "grade 2", "grade 3", "grade 4"]),
    "bloodmnist": ("What blood cell does this microscope image show?", [
        "basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte", "monocyte",
        "neutrophil", "platelet"]),
    "tissuemnist": ("What kidney cortex cell does this microscope image show?", [
        "collecting duct or connecting tubule", "distal convoluted tubule", "glomerular endothelial cell",
        "interstitial endothelial cell", "leukocyte", "podocyte", "proximal tubule segment", "thick ascending limb"]),
    "organamnist": ("Which organ does this axial abdominal CT slice show?", _ORGANS),
    "organcmnist": ("Which organ does this coronal abdominal CT slice show?", _ORGANS),
    "organsmnist": ("Which organ does this sagittal abdominal CT slice show?", _ORGANS),
}
GENERIC_QUESTION = "What does this image show?"
SPLITS = ("train", "val", "test")


@dataclass
class Example:
    image: object  # anything image.load_image takes (PIL image, path, bytes, base64, data URL)
    messages: list[dict]  # with exactly one <image> mark in the user's text
    label: int | None = None  # class index, for classification data


@dataclass
class ClassTask:
    """A classification data set asked as a question: answers are class names."""

    name: str
    question: str
    class_names: list[str]

    def messages(self, label: int | None = None) -> list[dict]:
        user = {"role": "user", "content": f"{IMAGE}\n{self.question}"}
        return [user] if label is None else [user, {"role": "assistant", "content": self.class_names[label]}]


# ---- MedMNIST ------------------------------------------------------------------------------------
def medmnist_task(path: str | os.PathLike, num_classes: int) -> ClassTask:
    """The question and class names for a MedMNIST file, known by its name (e.g. breastmnist*.npz)."""
    stem = Path(path).name.lower().split(".")[0]
    name = max((k for k in MEDMNIST if stem.startswith(k)), key=len, default=None)
    if name is not None and len(MEDMNIST[name][1]) == num_classes:
        question, names = MEDMNIST[name]
        return ClassTask(name, question, list(names))
    return ClassTask(stem, GENERIC_QUESTION, [f"class {i}" for i in range(num_classes)])


def load_medmnist(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, ClassTask]:
    """images uint8 (N, H, W) or (N, H, W, 3), labels int64 (N,), and the task of a MedMNIST 2D .npz."""
    path = Path(path)
    if split not in SPLITS:
        raise VLMDataError(f"split {split!r}: use one of {SPLITS}")
    if not path.is_file():
        raise VLMDataError(f"{path}: no such file (MedMNIST .npz files come from `pip install medmnist` or zenodo)")
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise VLMDataError(f"{path}: not a readable .npz ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy holds one array, not the splits
        raise VLMDataError(f"{path}: a single array, not a .npz archive of {{train,val,test}}_{{images,labels}} arrays")
    for key in (f"{split}_images", f"{split}_labels"):
        if key not in data.files:
            raise VLMDataError(f"{path}: no '{key}' array (a MedMNIST file holds {{train,val,test}}_{{images,labels}})")
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))):
        raise VLMDataError(f"{path}: {split}_images is {images.dtype} {images.shape}; expected uint8 (N, H, W) or (N, H, W, 3)")
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise VLMDataError(f"{path}: {split}_labels is {labels.shape}, multi-label (as ChestMNIST); train-vlm needs one class per image")
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise VLMDataError(f"{path}: {len(images)} {split} images but {len(labels)} labels")
    if len(labels) == 0:
        raise VLMDataError(f"{path}: the {split} split is empty")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    # the class count is read over every split, empty ones aside, so all splits name classes alike
    num_classes = max(int(data[key].max()) + 1 for s in SPLITS if (key := f"{s}_labels") in data.files and data[key].size)
    return images, labels, medmnist_task(path, num_classes)


def medmnist_examples(path: str | os.PathLike, split: str) -> tuple[list[Example], ClassTask]:
    images, labels, task = load_medmnist(path, split)
    examples = [Example(Image.fromarray(img), task.messages(int(y)), int(y)) for img, y in zip(images, labels)]
    return examples, task


# ---- JSONL ---------------------------------------------------------------------------------------
def _has_image_mark(content) -> int:
    if isinstance(content, str):
        return content.count(IMAGE)
    if isinstance(content, list):
        return sum(1 for p in content if isinstance(p, dict) and p.get("type") in ("image", "image_url"))
    return 0


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Examples from `{"image": ..., "messages": [...]}` lines; image paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise VLMDataError(f"{path}: no such file")
    examples = []
    for n, line in jsonl_lines(path, VLMDataError, "image-text pairs"):
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise VLMDataError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(record, dict) or "image" not in record or "messages" not in record:
            raise VLMDataError(f"{where}: needs 'image' and 'messages'")
        image, messages = record["image"], record["messages"]
        if not isinstance(image, str) or not image:
            raise VLMDataError(f"{where}: 'image' must be a path, base64 text or a data URL")
        if image[:5].lower() != "data:" and len(image) < 4096 and not os.path.isabs(image) and is_file(path.parent / image):
            image = str(path.parent / image)
        if not isinstance(messages, list) or not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise VLMDataError(f"{where}: 'messages' must be a list with at least one assistant reply to learn")
        marks = sum(_has_image_mark(m.get("content")) for m in messages if isinstance(m, dict))
        if marks > 1:
            raise VLMDataError(f"{where}: {marks} image marks, but a line holds one image")
        if marks == 0:
            messages = _mark_first_user(messages, where)
        label = record.get("label")
        if label is not None and (not isinstance(label, int) or isinstance(label, bool) or label < 0):
            # the class balancing counts labels with bincount: a name or -1 would fail deep in training
            raise VLMDataError(f"{where}: 'label' must be a class index (a whole number >= 0), got {label!r:.80}")
        examples.append(Example(image, messages, label))
    if not examples:
        raise VLMDataError(f"{path}: no examples")
    return examples


def _mark_first_user(messages: list[dict], where: str) -> list[dict]:
    messages = [dict(m) for m in messages]
    for m in messages:
        if m.get("role") == "user":
            content = m.get("content")
            m["content"] = f"{IMAGE}\n{content}" if isinstance(content, str) else [{"type": "image"}] + list(content or [])
            return messages
    raise VLMDataError(f"{where}: no user message to attach the image to")


# ---- augmentation and encoding ---------------------------------------------------------------------
def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random small rotation, scale, shift and horizontal flip, then brightness and contrast jitter."""
    w, h = image.size
    angle = np.deg2rad(rng.uniform(-10, 10))
    scale = rng.uniform(0.9, 1.1)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    tx, ty = rng.uniform(-0.08, 0.08) * w, rng.uniform(-0.08, 0.08) * h
    # PIL wants the inverse map, output pixel -> input pixel, about the centre
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    a, b, d, e = flip * cos, sin, -flip * sin, cos
    cx, cy = w / 2, h / 2
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    image = image.transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))


def expand_with_mask(ids: list[int], mask: list[bool], image_id: int, n_positions: int) -> tuple[list[int], list[bool]]:
    """Replace the single <image> id by n_positions copies (never a target)."""
    at = ids.index(image_id)
    return ids[:at] + [image_id] * n_positions + ids[at + 1:], mask[:at] + [False] * n_positions + mask[at + 1:]


def load_views(example: Example, vcfg: VisionConfig, rng: np.random.Generator | None = None) -> ImageInput:
    try:
        image = load_image(example.image)
    except ImageError as e:
        raise VLMDataError(f"example image: {e}") from e
    if rng is not None:  # in the tower's mode first: ImageEnhance refuses palette, 16-bit and 1-bit images
        image = augment(to_mode(image, vcfg), rng)
    return preprocess(image, vcfg)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    targets: torch.Tensor  # (B, T), next-token targets, -100 where nothing is learned
    images: list[ImageInput]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.targets.to(device),
                     [ImageInput(im.views.to(device), im.tiles) for im in self.images])


def padding_id(tok: Tokenizer) -> int:
    """What ends short rows of a batch: the padding token, or EOS for a tokenizer without one."""
    return tok.pad_id if tok.pad_id is not None else tok.eos_id


def make_batch(examples: list[Example], tok: Tokenizer, vcfg: VisionConfig, rng: np.random.Generator | None = None) -> Batch:
    """Encode conversations for training: ids with image runs, targets shifted by one, padding ignored."""
    rows, images = [], []
    for ex in examples:
        views = load_views(ex, vcfg, rng)
        ids, mask = tok.encode_chat_for_training(ex.messages)
        ids, mask = expand_with_mask(ids, mask, tok.image_id, image_token_count(vcfg, views.tiles))
        rows.append((ids, mask))
        images.append(views)
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), padding_id(tok), dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, mask) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        # position t predicts ids[t + 1]; learn it where ids[t + 1] is part of a reply
        learn = torch.tensor(mask[1:], dtype=torch.bool)
        targets[i, : len(ids) - 1] = torch.where(learn, torch.tensor(ids[1:]), -100)
    return Batch(input_ids, targets, images)


def prompt_ids(tok: Tokenizer, messages: list[dict], views: ImageInput, vcfg: VisionConfig) -> list[int]:
    """The ids of a prompt for the assistant's reply (a final reply in messages is left out), <image> expanded."""
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    ids = tok.encode_chat(messages, add_generation_prompt=True)
    if ids.count(tok.image_id) != 1:
        raise VLMDataError(f"the prompt has {ids.count(tok.image_id)} <image> marks; expected 1")
    return expand_with_mask(ids, [False] * len(ids), tok.image_id, image_token_count(vcfg, views.tiles))[0]
