"""VLM data and training: MedMNIST and JSONL loading, reply-only targets, a tiny training run that
lowers its loss, eval-vlm's output, AUC, and starting from a text checkpoint."""

import argparse
import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nanoseek
from nanoseek.cli import main
from nanoseek.tokenizer import IMAGE, Tokenizer
from nanoseek.train import vlm
from nanoseek.train.vlm_data import (
    Example, VLMDataError, load_medmnist, make_batch, medmnist_examples, medmnist_task, prompt_ids, read_jsonl,
)
from nanoseek.train.vlm_eval import evaluate, image_views, multiclass_auc, roc_auc
from nanoseek.image import preprocess
from nanoseek.model.vision import VisionConfig, image_token_count

BREAST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist" / "breastmnist.npz"
# one stem stage of 4 channels makes the 2-pixel patches (train-vlm's default stem makes 4-pixel ones)
TINY = ["--image-size", "8", "--patch-size", "2", "--conv-stem", "4", "--vision-width", "32", "--vision-layers", "1",
        "--vision-heads", "2"]


def fake_medmnist(path: Path, n_classes=2, rgb=False, n=(64, 16, 16), size=8, seed=0):
    """Classes told apart by brightness, so a few steps can learn them."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n):
        labels = rng.integers(0, n_classes, count)
        shape = (count, size, size, 3) if rgb else (count, size, size)
        noise = rng.random(shape) * 40
        level = (labels * (200 // max(1, n_classes - 1))).reshape((-1,) + (1,) * (len(shape) - 1))
        arrays[f"{split}_images"] = np.clip(noise + level, 0, 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def parse(argv):
    parser = argparse.ArgumentParser()
    vlm.add_arguments(parser)
    return parser.parse_args(argv)


def test_medmnist_tasks_use_class_names():
    task = medmnist_task("data/breastmnist.npz", 2)
    assert task.question == "What does this breast ultrasound show?"
    assert task.class_names == ["malignant", "normal or benign"]
    assert medmnist_task("pneumoniamnist_variant.npz", 2).class_names == ["normal", "pneumonia"]
    assert len(medmnist_task("organsmnist.npz", 11).class_names) == 11
    unknown = medmnist_task("mystery.npz", 3)
    assert unknown.class_names == ["class 0", "class 1", "class 2"] and unknown.question == "What does this image show?"


def test_medmnist_loader_takes_grayscale_and_rgb_and_any_class_count(tmp_path):
    images, labels, task = load_medmnist(fake_medmnist(tmp_path / "gray.npz"), "val")
    assert images.shape == (16, 8, 8) and labels.dtype == np.int64 and task.class_names == ["class 0", "class 1"]
    examples, task = medmnist_examples(fake_medmnist(tmp_path / "dermamnist.npz", n_classes=7, rgb=True), "train")
    assert examples[0].image.mode == "RGB" and len(task.class_names) == 7
    assert examples[0].messages[1]["content"] == task.class_names[examples[0].label]
    assert examples[0].messages[0]["content"] == f"{IMAGE}\n{task.question}"
    multi = tmp_path / "chestmnist.npz"
    np.savez(multi, train_images=np.zeros((2, 8, 8), np.uint8), train_labels=np.zeros((2, 14), np.uint8))
    with pytest.raises(VLMDataError, match="multi-label"):
        load_medmnist(multi, "train")
    with pytest.raises(VLMDataError, match="no 'val_images'"):
        load_medmnist(multi, "val")


def test_jsonl_images_by_path_and_base64(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, "PNG")
    (tmp_path / "a.png").write_bytes(png.getvalue())
    lines = [
        {"image": "a.png", "messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "dark"}]},
        {"image": base64.b64encode(png.getvalue()).decode(),
         "messages": [{"role": "user", "content": f"Look: {IMAGE} what?"}, {"role": "assistant", "content": "dark"}]},
    ]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    examples = read_jsonl(tmp_path / "d.jsonl")
    assert examples[0].image == str(tmp_path / "a.png")
    assert examples[0].messages[0]["content"] == f"{IMAGE}\nDescribe."  # mark added before the text
    assert examples[1].messages[0]["content"] == f"Look: {IMAGE} what?"
    bad = dict(lines[1], messages=[{"role": "user", "content": f"{IMAGE}{IMAGE}"}, {"role": "assistant", "content": "x"}])
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(VLMDataError, match="2 image marks"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(VLMDataError, match=r"bad2.jsonl:1: needs 'image' and 'messages'"):
        read_jsonl(tmp_path / "bad2.jsonl")


def test_batches_learn_only_the_reply(tmp_path):
    examples, task = medmnist_examples(fake_medmnist(tmp_path / "breastmnist.npz"), "train")
    tok = Tokenizer.train(vlm.data_texts(examples), vocab_size=300)
    vcfg = VisionConfig(image_size=8, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_tiles=1)
    batch = make_batch(examples[:4], tok, vcfg)
    n_image = image_token_count(vcfg)
    for row, ex in zip(range(4), examples):
        ids = batch.input_ids[row].tolist()
        assert ids.count(tok.image_id) == n_image
        start = ids.index(tok.image_id)
        assert ids[start : start + n_image] == [tok.image_id] * n_image
        learned = [t for t in batch.targets[row].tolist() if t != -100]
        assert tok.decode(learned) == task.class_names[ex.label] + tok.eos_token  # the reply and its end, nothing else
    prompt = prompt_ids(tok, examples[0].messages, batch.images[0], vcfg)
    assert prompt[-1] == tok.assistant_id and prompt.count(tok.image_id) == n_image


def test_mixup_loss_is_the_weighted_loss_of_both_replies_after_the_mixed_image(tmp_path):
    examples, task = medmnist_examples(fake_medmnist(tmp_path / "breastmnist.npz"), "train")
    args = parse(["--data", "x", "--out", "y", "--mixup", "0.4", "--label-smoothing", "0", *TINY])
    model, tok = vlm.build_vlm(args, vlm.data_texts(examples))
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    batch = make_batch(examples[:6], tok, vcfg)
    loss, ids = vlm.mixup_loss(model, batch, args, np.random.default_rng(3))
    rng = np.random.default_rng(3)  # the same draws, by hand
    lam = float(rng.beta(0.4, 0.4))
    other = torch.from_numpy(rng.permutation(6))
    mixed = [type(im)(lam * im.views + (1 - lam) * batch.images[j].views, im.tiles) for im, j in zip(batch.images, other.tolist())]
    own = model(inputs_embeds=model.embed_multimodal(batch.input_ids, mixed))
    theirs = model(inputs_embeds=model.embed_multimodal(batch.input_ids[other], mixed))
    expected = lam * vlm.reply_loss(own, batch.targets, args) + (1 - lam) * vlm.reply_loss(theirs, batch.targets[other], args)
    assert 0 < lam < 1 and not torch.equal(other, torch.arange(6))
    torch.testing.assert_close(loss, expected)
    assert torch.equal(ids, torch.cat([batch.input_ids, batch.input_ids[other]]))


@pytest.mark.parametrize("mixup", ["0", "0.4"])
def test_router_bias_learns_from_real_tokens_not_padding(tmp_path, mixup):
    """Replies differ in length ("malignant" vs "normal or benign"), so batches end in padding."""
    examples, _ = medmnist_examples(fake_medmnist(tmp_path / "breastmnist.npz"), "train")
    args = parse(["--data", "x", "--out", "y", "--mixup", mixup, *TINY])
    model, tok = vlm.build_vlm(args, vlm.data_texts(examples))
    batch = make_batch(examples[:8], tok, VisionConfig.from_dict(model.config.vision_config))
    n_pad = int((batch.input_ids == tok.pad_id).sum())
    assert n_pad > 0
    seen = []
    original = vlm.update_router_bias
    try:
        vlm.update_router_bias = lambda moe, counts, rate: seen.append(int(counts.sum()))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        vlm.train_step(model, batch, optimizer, 1e-3, args, np.random.default_rng(0))
    finally:
        vlm.update_router_bias = original
    # mixup reads the batch twice (own replies, then a permutation's): twice the real tokens
    reads = 2 if mixup != "0" else 1
    real_tokens = reads * (batch.input_ids.numel() - n_pad)
    assert seen and all(count == real_tokens * model.config.num_experts_per_tok for count in seen)


def test_tiny_vlm_training_lowers_the_loss_and_eval_reports_accuracy(tmp_path, capsys):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "4", "--steps", "24", "--eval-every", "8", "--batch-size", "16",
                  "--lr", "3e-3", "--warmup-steps", "2", "--val-views", "2", *TINY])
    info = vlm.run_training(args)
    losses = [h["train_loss"] for h in info["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert info["history"][0]["stage"] == 1 and info["history"][-1]["stage"] == 2
    model = nanoseek.load(tmp_path / "vlm")
    assert model.vision is not None and model.config.image_token_id == Tokenizer.load(tmp_path / "vlm").image_id
    capsys.readouterr()
    assert main(["eval-vlm", "--model", str(tmp_path / "vlm"), "--data", str(data), "--split", "test"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("accuracy: ") and lines[-2].startswith("auc: ")
    assert "1 view of each" in lines[-4] and not any(line.startswith("accuracy with") for line in lines)
    assert float(lines[-1].split()[1]) >= 0.75  # brightness is easy: the tiny model must get most of it
    assert main(["eval-vlm", "--model", str(tmp_path / "vlm"), "--data", str(data), "--views", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("accuracy: ") and lines[-2].startswith("auc: ")
    assert lines[-3].startswith("accuracy with 1 view: ") and "4 views of each" in lines[-5]

    # test-time augmentation: view 0 is the image itself, so 1 view reproduces the single-view figure
    examples, task = medmnist_examples(data, "test")
    tok = Tokenizer.load(tmp_path / "vlm")
    three = evaluate(model, tok, examples, task, views=3)
    one = evaluate(model, tok, examples, task, views=1)
    assert "accuracy_one_view" not in one and three["views"] == 3
    assert three["accuracy_one_view"] == one["accuracy"]
    assert main(["eval-vlm", "--model", str(tmp_path / "vlm"), "--data", str(data), "--views", "0"]) == 2
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "v0"), "--val-views", "0"]) == 2


def test_train_vlm_command_exits_0(tmp_path):
    """The command's exit status, not just run_training: it once returned run_training's summary
    dict, which sys.exit printed and turned into status 1 after a successful run."""
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "1",
                 "--steps", "2", "--eval-every", "2", "--batch-size", "8", *TINY]) == 0
    assert (tmp_path / "vlm" / "model.safetensors").is_file()


def test_eval_views_are_the_image_then_reproducible_augmentations():
    vcfg = VisionConfig(**{**VisionConfig().to_dict(), "image_size": 16, "patch_size": 4})
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    examples = [Example(Image.fromarray(pixels), [], 0), Example(Image.fromarray(pixels[::-1].copy()), [], 1)]
    views = image_views(examples, vcfg, 4)
    again = image_views(examples, vcfg, 4)
    assert len(views) == 4 and all(len(v) == 2 for v in views)
    torch.testing.assert_close(views[0][0].views, preprocess(Image.fromarray(pixels), vcfg).views)
    for v in range(4):
        for i in range(2):
            assert torch.equal(views[v][i].views, again[v][i].views) and views[v][i].tiles == views[0][i].tiles
    assert not torch.equal(views[1][0].views, views[2][0].views)  # each view a different draw
    assert not torch.equal(views[1][0].views, views[0][0].views)


def test_start_from_a_text_checkpoint_keeps_its_weights(tmp_path):
    tok = Tokenizer.train(["What does this image show? class 0 class 1"] * 4, vocab_size=300)
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    text_model = nanoseek.build_model(config, seed=3)
    nanoseek.save(text_model, tmp_path / "text", extra_files=tok.files())
    data = fake_medmnist(tmp_path / "x.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--init", str(tmp_path / "text"), *TINY])
    model, tok2 = vlm.build_vlm(args, [])
    assert tok2.image_id == tok.image_id == model.config.image_token_id
    assert torch.equal(model.model.embed_tokens.weight, text_model.model.embed_tokens.weight)
    assert torch.equal(model.model.layers[1].mlp.experts.down_proj, text_model.model.layers[1].mlp.experts.down_proj)
    assert model.vision.vcfg.patch_size == 2
    # stage 1 trains the projector and the layout tokens only
    vlm.set_stage(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("vision.projector.", "vision.image_newline", "vision.view_separator")) for n in trainable)
    vlm.set_stage(model, 2)
    assert all(p.requires_grad for p in model.parameters())


def test_class_weights_match_the_requested_prior():
    from nanoseek.train.vlm_data import Example

    train = [Example(None, [], 0)] * 10 + [Example(None, [], 1)] * 90
    val = [Example(None, [], 0)] * 30 + [Example(None, [], 1)] * 70

    def share_of_class_0(balance):
        w = vlm.class_weights(train, val, balance)
        return float(w[:10].sum() / w.sum())

    assert share_of_class_0("val") == pytest.approx(0.3)
    assert share_of_class_0("classes") == pytest.approx(0.5)
    assert vlm.class_weights(train, val, "none") is None
    assert vlm.class_weights(train, [], "val") is None  # nothing to match: the training split as it is
    order = vlm.epoch_order(100, vlm.class_weights(train, val, "classes"), torch.Generator().manual_seed(0))
    assert len(order) == 100 and 30 < sum(i < 10 for i in order) < 70


def test_auc_matches_hand_counts():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == 0.75
    assert roc_auc(np.array([0.5, 0.5, 0.5]), np.array([True, False, False])) == 0.5  # ties count half
    probs = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    assert multiclass_auc(probs, np.array([0, 1, 2, 0])) == 1.0


@pytest.mark.skipif(not BREAST.exists(), reason="needs ../shared/data/medmnist/breastmnist.npz")
def test_real_breastmnist_loads():
    examples, task = medmnist_examples(BREAST, "test")
    assert len(examples) == 156 and task.name == "breastmnist"
    assert sorted(set(ex.label for ex in examples)) == [0, 1]


def test_bad_input_to_the_vlm_commands_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["train-vlm", "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "out")]) == 2
    assert "missing.npz: no such file" in capsys.readouterr().err
    assert main(["eval-vlm", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "missing.npz")]) == 2
    assert "no-model" in capsys.readouterr().err
    assert main(["eval-vlm", "--model", str(tmp_path), "--data", "x.npz", "--device", "gpu"]) == 2
    assert "not a device name" in capsys.readouterr().err
