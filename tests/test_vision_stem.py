"""The vision tower's convolutional stem (`vision_config.stem_channels`, `train-vlm --conv-stem`): its
config checks, the grid it makes, checkpoints that keep its batch-norm statistics, evaluation mode
after loading, and projector-only training that leaves the statistics alone."""

import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ConfigError
from nanoseek.model.vision import VisionConfig, expand_image_tokens, image_token_count
from nanoseek.train import vlm

from test_vision import IMAGE_ID, VISION, images, tiny_vlm
from test_vlm import TINY, fake_medmnist, parse

STEM = dict(VISION, patch_size=4, stem_channels=[8, 16])  # two halvings: 16 px -> a 4x4 grid


def stem_norms(model):
    return [m for m in model.vision.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_stem_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"vision_config.stem_channels.*2\*\*len\(stem_channels\) = 8"):
        VisionConfig(**{**STEM, "stem_channels": [8, 16, 32]})
    with pytest.raises(ConfigError, match="vision_config.stem_channels.*positive integers"):
        VisionConfig(**{**STEM, "stem_channels": [8, 0]})
    with pytest.raises(ConfigError, match="vision_config.stem_channels.*positive integers"):
        VisionConfig(**{**STEM, "stem_channels": "8,16"})
    with pytest.raises(ConfigError, match="vision_config.image_size.*multiple of patch_size"):
        VisionConfig(**{**STEM, "image_size": 18})
    with pytest.raises(ConfigError, match="vision_config.patch_overlap.*patchify stem only"):
        VisionConfig(**{**STEM, "patch_overlap": 1})
    assert VisionConfig(**VISION).stem_channels == []  # SigLIP's patchify stem by default


def test_stem_makes_the_configured_grid_and_layout():
    model = tiny_vlm(patch_size=4, stem_channels=[8, 16])
    vcfg = model.vision.vcfg
    embed = model.vision.encoder.patch_embed
    assert [tuple(m.weight.shape) for m in embed.stem if isinstance(m, torch.nn.Conv2d)] == [
        (8, 3, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3)]
    assert embed.proj.weight.shape == (VISION["hidden_size"], 16, 1, 1)
    with torch.no_grad():
        assert model.vision.encoder(torch.randn(2, 3, 16, 16)).shape == (2, 4, 4, VISION["hidden_size"])
    ims = images(vcfg, (0, 0), (1, 2))
    ids = torch.tensor([expand_image_tokens([1, IMAGE_ID, 2, IMAGE_ID], IMAGE_ID, ims, vcfg)])
    assert ids.shape[1] == 2 + image_token_count(vcfg) + image_token_count(vcfg, (1, 2))
    with torch.no_grad():
        assert model(inputs_embeds=model.embed_multimodal(ids, ims)).shape[:2] == ids.shape


def test_checkpoint_keeps_the_stem_and_its_statistics(tmp_path):
    model = tiny_vlm(patch_size=4, stem_channels=[8, 16])
    model.train()
    with torch.no_grad():  # a training-mode pass moves the running statistics off their start
        model.vision.encoder(torch.randn(4, 3, 16, 16) * 3 + 1)
    model.eval()
    assert not torch.equal(stem_norms(model)[0].running_mean, torch.zeros(8))
    nanoseek.save(model, tmp_path / "vlm")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vlm" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("vision.encoder.patch_embed.stem.0.weight", "vision.encoder.patch_embed.stem.4.running_var",
                "vision.encoder.patch_embed.stem.7.running_mean", "vision.encoder.patch_embed.stem.10.num_batches_tracked",
                "vision.encoder.patch_embed.proj.weight", "vision.encoder.patch_embed.proj.bias"):
        assert key in keys, key
    loaded = nanoseek.load(tmp_path / "vlm")
    assert not loaded.training and not any(m.training for m in stem_norms(loaded))
    for a, b in zip(stem_norms(model), stem_norms(loaded)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    vcfg = loaded.vision.vcfg
    ims = images(vcfg, (0, 0))
    ids = torch.tensor([expand_image_tokens([1, IMAGE_ID, 2], IMAGE_ID, ims, vcfg)])
    with torch.no_grad():  # one image alone: batch statistics would differ, running ones do not
        assert torch.equal(model(inputs_embeds=model.embed_multimodal(ids, ims)),
                           loaded(inputs_embeds=loaded.embed_multimodal(ids, ims)))


def test_projector_stage_leaves_the_stem_statistics_alone(tmp_path):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "3", "--steps", "0",
                  "--eval-every", "3", "--batch-size", "8", *TINY, "--conv-stem", "8"])
    model, _ = vlm.build_vlm(args, ["malignant", "normal or benign"])
    before = [m.running_mean.clone() for m in stem_norms(model)]
    vlm.set_stage(model, 1)
    vlm.train_mode(model, 1)
    assert model.training and not any(m.training for m in stem_norms(model))
    with torch.no_grad():
        model.vision.encoder(torch.randn(4, 3, 8, 8) + 2)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, stem_norms(model)))
    vlm.train_mode(model, 2)
    assert all(m.training for m in stem_norms(model))
    with torch.no_grad():
        model.vision.encoder(torch.randn(4, 3, 8, 8) + 2)
    assert not torch.equal(before[0], stem_norms(model)[0].running_mean)
    # and through the whole run: projector steps only, so the saved statistics are the initial ones
    vlm.run_training(args)
    saved = nanoseek.load(tmp_path / "vlm")
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, stem_norms(saved)))


def test_train_vlm_with_a_stem_learns_and_checks_its_flag(tmp_path, capsys):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "4", "--steps", "24",
                  "--eval-every", "8", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2",
                  *TINY, "--conv-stem", "8"])
    assert args.conv_stem == [8] and args.patch_overlap is None
    info = vlm.run_training(args)
    losses = [h["train_loss"] for h in info["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    vcfg = nanoseek.load(tmp_path / "vlm").vision.vcfg
    assert vcfg.stem_channels == [8] and vcfg.patch_overlap == 0  # the overlap default gives way to the stem
    default = parse(["--data", "d.npz", "--out", "o"])
    assert default.conv_stem == [32, 64] and default.patch_size == 4  # the default stem makes the default patch
    assert parse(["--data", "d.npz", "--out", "o", "--conv-stem", ""]).conv_stem == []
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "bad"), "--conv-stem", "8,x"])
    assert "comma-separated channel counts" in capsys.readouterr().err
    # a stem that does not make the patch size, or an overlap beside a stem: one line, exit status 2
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "bad"), *TINY, "--conv-stem", "8,16"]) == 2
    assert "--conv-stem 8,16 makes patches of 4 pixels" in capsys.readouterr().err
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "bad"), *TINY, "--patch-overlap", "1"]) == 2
    assert "--patch-overlap applies to the single patch convolution" in capsys.readouterr().err
    # SigLIP's patch convolution on request, with the overlap that was the default before the stem
    args = parse(["--data", str(data), "--out", str(tmp_path / "p"), *TINY, "--conv-stem", ""])
    vcfg = VisionConfig.from_dict(vlm.vision_config(args))
    assert vcfg.stem_channels == [] and vcfg.patch_overlap == 2


def test_sam_counts_each_batch_once_in_the_stem_statistics(tmp_path):
    """SAM's second pass at the perturbed weights must not move the running statistics again."""
    import numpy as np
    from nanoseek.train.vlm_data import make_batch

    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "v"), "--sam", "0.5", *TINY, "--conv-stem", "8"])
    train, _, _ = vlm.load_data(args)
    model, tok = vlm.build_vlm(args, vlm.data_texts(train))
    batch = make_batch(train[:8], tok, model.vision.vcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    rng = np.random.default_rng(0)
    states = (rng.bit_generator.state, vlm.torch_rng_states(model.device))
    vlm.batch_loss(model, batch, args, rng)[0].backward()
    after_one_pass = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in stem_norms(model)]
    vlm.sharpness_aware_grads(model, batch, params, args, rng, states)
    for (mean, var, n), m in zip(after_one_pass, stem_norms(model)):
        assert torch.equal(mean, m.running_mean) and torch.equal(var, m.running_var) and n == int(m.num_batches_tracked) == 1


def test_params_counts_the_vision_tower(tmp_path, capsys):
    model = tiny_vlm(patch_size=4, stem_channels=[8, 16])
    nanoseek.save(model, tmp_path / "vlm")
    assert main(["params", str(tmp_path / "vlm")]) == 0
    out = capsys.readouterr().out
    n_vision = sum(p.numel() for p in model.vision.parameters())
    assert f"vision tower (encoder, projector, layout tokens; read once per image): {n_vision / 1e3:.2f}K" in out
    assert main(["params", "test"]) == 0 and "vision tower" not in capsys.readouterr().out
