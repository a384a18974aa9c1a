"""`nanoseek eval-vlm`: accuracy and AUC of a vision-language model on a MedMNIST 2D .npz.

    nanoseek eval-vlm --model runs/breast-vlm --data breastmnist.npz --split test

For every image the model is asked the subset's question and generates an answer greedily; the
answer is right when it is the class name of the label (case and a final full stop ignored). AUC
is computed from the probability the model gives each class name as the whole answer (its tokens
and the end-of-sentence after them), normalised over the classes: one-vs-rest ROC AUC, averaged
over classes for more than two, as MedMNIST does. The last line printed is `accuracy: 0.xxx`.

Test-time augmentation (`--views N`, default 1: off): the model looks at each image N times, as
it is and as N - 1 draws of the training augmentation (vlm_data.augment: small rotation, scale,
shift, horizontal flip, brightness and contrast), seeded by view and image so a run is
reproducible. The answer is still generated token by token, greedily, from the next-token
probabilities averaged over the views; AUC uses the class probabilities averaged over the views;
the single-view accuracy is printed beside it. It is not the default because it helps one subset
and hurts another: on BreastMNIST, over 16 checkpoints, 16 views raised the mean val accuracy from
0.890 to 0.911 and the test accuracy of the default recipe's four seeds from 0.837 to 0.848; on
the PneumoniaMNIST copy it moved answers towards "pneumonia" (test: normal images called normal
192 -> 134 of 234, pneumonia 363 -> 386 of 390), which the val split's 74% pneumonia rewarded
(0.926 -> 0.931) and the test split's 62.5% punished (0.889 -> 0.833).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..model.transformer import DeepSeekModel
from ..model.vision import ImageInput, VisionConfig
from ..tokenizer import Tokenizer
from .vlm_data import ClassTask, Example, VLMDataError, load_views, medmnist_examples, prompt_ids


def _batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices grouped by prompt length (so no padding is needed), then cut into batches."""
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    return [idx[j : j + batch_size] for idx in by_length.values() for j in range(0, len(idx), batch_size)]


@torch.no_grad()
def generate_answers(model: DeepSeekModel, tok: Tokenizer, prompts: list[list[int]], views: list[list[ImageInput]],
                     *, max_new_tokens: int = 16, batch_size: int = 64) -> list[str]:
    """Greedy answers, one per prompt (ids with image runs), decoded without special tokens.

    views[v][i] is prompt i's image as seen in view v (all views of an image have the same tiles);
    each token is the argmax of the next-token probabilities averaged over the views."""
    answers: list[str] = [""] * len(prompts)
    stop = set(model.config.eos_token_ids) | {tok.eos_id}
    for idx in _batches(prompts, batch_size):
        ids = torch.tensor([prompts[i] for i in idx], device=model.device)
        embeds = [model.embed_multimodal(ids, [view[i] for i in idx]) for view in views]  # V x (B, T, D)
        out = torch.empty(len(idx), 0, dtype=torch.long, device=model.device)
        done = torch.zeros(len(idx), dtype=torch.bool, device=model.device)
        stop_ids = torch.tensor(sorted(stop), device=model.device)
        # answers are a few tokens, so the prompt is simply run again each step (no KV cache needed)
        for _ in range(max_new_tokens):
            probs = sum(torch.softmax(model(inputs_embeds=e)[:, -1].float(), dim=-1) for e in embeds)  # (B, vocab)
            next_id = probs.argmax(-1)  # (B,)
            out = torch.cat([out, next_id[:, None]], dim=1)
            done |= torch.isin(next_id, stop_ids)
            if done.all():
                break
            next_embeds = model.embed(next_id[:, None])
            embeds = [torch.cat([e, next_embeds], dim=1) for e in embeds]
        for row, i in enumerate(idx):
            tokens = out[row].tolist()
            cut = next((k for k, t in enumerate(tokens) if t in stop), len(tokens))
            answers[i] = tok.decode(tokens[:cut], skip_special_tokens=True)
    return answers


@torch.no_grad()
def answer_log_probs(model: DeepSeekModel, tok: Tokenizer, prompts: list[list[int]], images: list[ImageInput],
                     answers: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """(N, K) log-probability of each candidate answer (its tokens + end-of-sentence) after each prompt."""
    candidates = [tok.encode(a) + [tok.eos_id] for a in answers]
    scores = torch.empty(len(prompts), len(answers))
    for idx in _batches(prompts, batch_size):
        ids = torch.tensor([prompts[i] for i in idx], device=model.device)
        prompt_embeds = model.embed_multimodal(ids, [images[i] for i in idx])
        T = ids.shape[1]
        for k, cand in enumerate(candidates):
            cand_ids = torch.tensor(cand, device=model.device).expand(len(idx), -1)
            embeds = torch.cat([prompt_embeds, model.embed(cand_ids)], dim=1)
            logp = F.log_softmax(model(inputs_embeds=embeds)[:, T - 1 : -1].float(), dim=-1)  # predicts cand
            scores[idx, k] = logp.gather(-1, cand_ids.unsqueeze(-1)).squeeze(-1).sum(-1).cpu()
    return scores


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic with tied scores sharing their average rank.
    (Ten lines instead of a scikit-learn dependency for one function.)"""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def multiclass_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary: AUC of class 1's probability. More classes: mean one-vs-rest AUC (as MedMNIST's getAUC)."""
    if probs.shape[1] == 2:
        return roc_auc(probs[:, 1], labels == 1)
    aucs = [roc_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def normalise_answer(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def image_views(examples: list[Example], vcfg: VisionConfig, views: int = 1) -> list[list[ImageInput]]:
    """views x len(examples) preprocessed images: view 0 the images themselves, then draws of the
    training augmentation, seeded by (view, image index)."""
    return [[load_views(ex, vcfg, np.random.default_rng((v, i)) if v else None) for i, ex in enumerate(examples)]
            for v in range(views)]


def evaluate(model: DeepSeekModel, tok: Tokenizer, examples: list[Example], task: ClassTask, *,
             batch_size: int = 64, max_new_tokens: int | None = None, views: int = 1,
             one_view_too: bool = True) -> dict:
    """Generated-answer accuracy, AUC and the mean answer loss on labelled examples, the model looking
    at each image `views` times (see the module's docstring); with views > 1 and one_view_too also
    the accuracy of view 0 alone as "accuracy_one_view"."""
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    was_training = model.training
    model.eval()
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    images = image_views(examples, vcfg, views)
    prompts = [prompt_ids(tok, ex.messages, im, vcfg) for ex, im in zip(examples, images[0])]
    labels = np.array([ex.label for ex in examples])
    if max_new_tokens is None:  # enough for the longest class name and its end-of-sentence
        max_new_tokens = max(len(tok.encode(name)) for name in task.class_names) + 2
    names = [normalise_answer(n) for n in task.class_names]

    def accuracy_of(answers: list[str]) -> tuple[float, np.ndarray]:
        predicted = np.array([names.index(a) if a in names else -1 for a in map(normalise_answer, answers)])
        return float((predicted == labels).mean()), predicted

    answers = generate_answers(model, tok, prompts, images, max_new_tokens=max_new_tokens, batch_size=batch_size)
    accuracy, predicted = accuracy_of(answers)
    logp = torch.stack([answer_log_probs(model, tok, prompts, view, task.class_names, batch_size=batch_size)
                        for view in images])  # (views, N, K)
    result = {}
    if views > 1 and one_view_too:
        one_view = generate_answers(model, tok, prompts, images[:1], max_new_tokens=max_new_tokens, batch_size=batch_size)
        result["accuracy_one_view"] = accuracy_of(one_view)[0]
    model.train(was_training)
    probs = torch.softmax(logp, dim=-1).mean(0).numpy()
    label_logp = logp[:, torch.arange(len(labels)), torch.from_numpy(labels)]  # (views, N)
    return {
        "n": len(examples),
        "views": views,
        "accuracy": accuracy,
        "auc": multiclass_auc(probs, labels),
        "loss": float(-label_logp.mean()),
        "not_a_class": int((predicted == -1).sum()),
        "answers": answers,
        "predicted": predicted,
        **result,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder written by `nanoseek train-vlm`")
    parser.add_argument("--data", required=True, help="a MedMNIST 2D .npz")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--views", type=int, default=1,
                        help="test-time augmentation: look at each image N times, as it is and through N - 1 draws of "
                             "the training augmentation (default 1: off)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images only")
    parser.add_argument("--show", type=int, default=3, help="print this many example answers")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (a CUDA GPU when there is one)")


def run(args) -> int:
    from .checkpoint import report_user_errors

    return report_user_errors("eval-vlm", lambda: _run(args), (VLMDataError,))


def _run(args) -> int:
    from ..checkpoint import load
    from ..runtime import pick_device

    if args.views < 1:  # before loading anything: a bad flag should cost nothing
        raise VLMDataError(f"--views must be at least 1, got {args.views}")
    if args.batch_size < 1:
        raise VLMDataError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:  # 0 evaluated every image
        raise VLMDataError(f"--limit must be at least 1, got {args.limit}")
    start = time.perf_counter()
    model = load(args.model, dtype=torch.float32, device=pick_device(args.device)).eval()
    if model.vision is None:
        raise VLMDataError(f"{args.model}: not a vision-language model (its config.json has no vision_config)")
    tok = Tokenizer.load(args.model)
    examples, task = medmnist_examples(args.data, args.split)
    examples = examples[: args.limit] if args.limit is not None else examples
    result = evaluate(model, tok, examples, task, batch_size=args.batch_size, views=args.views)
    for ex, answer in list(zip(examples, result["answers"]))[: args.show]:
        print(f"Q: {task.question}  A: {answer!r}  (label: {task.class_names[ex.label]!r})")
    counts = np.bincount([ex.label for ex in examples], minlength=len(task.class_names))
    majority = counts.max() / counts.sum()
    print(f"{task.name} {args.split}: {result['n']} images, {len(task.class_names)} classes "
          f"(majority class {majority:.3f}), {args.views} view{'s' if args.views > 1 else ''} of each, "
          f"{time.perf_counter() - start:.1f}s")
    print(f"answers that are no class name: {result['not_a_class']}")
    if args.views > 1:
        print(f"accuracy with 1 view: {result['accuracy_one_view']:.3f}")
    print(f"auc: {result['auc']:.3f}")
    print(f"accuracy: {result['accuracy']:.3f}")
    return 0
