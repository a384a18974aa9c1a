"""train-vlm fixes and additions of stop 20: `--init` from a text model with MTP modules (it crashed
on the MTP's MoE, which never runs in a VLM forward), flags outside their meaning refused in one line
(they were tracebacks or silently accepted), and `--sam` (sharpness-aware minimisation)."""

import argparse

import numpy as np
import pytest
import torch

import nanoseek
from nanoseek.cli import main
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import vlm

from test_vlm import TINY, fake_medmnist

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_vlm_starts_from_a_text_model_with_mtp_modules(tmp_path):
    config = nanoseek.get_preset("test").replace(num_nextn_predict_layers=1)
    tok = Tokenizer.train(["a breast ultrasound shows something malignant or normal or benign"] * 20, 300)
    nanoseek.save(nanoseek.build_model(config.replace(vocab_size=tok.vocab_size), seed=0), tmp_path / "text",
                  extra_files=tok.files())
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    assert main(["train-vlm", "--data", str(data), "--init", str(tmp_path / "text"), "--out", str(tmp_path / "vlm"),
                 "--projector-steps", "1", "--steps", "1", "--eval-every", "1", "--batch-size", "8", *TINY]) == 0
    assert nanoseek.load(tmp_path / "vlm").vision is not None


@pytest.mark.parametrize("flag,value", [("--lr", "-1"), ("--eval-every", "0"), ("--label-smoothing", "2"),
                                        ("--ema", "1.5"), ("--ema", "-1"), ("--mixup", "-1"), ("--drop-path", "2"),
                                        ("--warmup-steps", "-1"), ("--grad-clip", "-1"), ("--sam", "-1"),
                                        ("--max-minutes", "0"), ("--lr", "nan")])
def test_train_vlm_refuses_flags_outside_their_meaning(tmp_path, capsys, flag, value):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "vlm"), flag, value, *TINY]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be" in err and err.count("\n") == 1 and not (tmp_path / "vlm").exists()


def test_eval_vlm_refuses_a_batch_size_below_1(tmp_path, capsys):
    assert main(["eval-vlm", "--model", str(tmp_path / "none"), "--data", "x.npz", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1, got 0" in capsys.readouterr().err


def parse(argv):
    parser = argparse.ArgumentParser()
    vlm.add_arguments(parser)
    return parser.parse_args(argv)


def test_sam_takes_the_gradient_at_the_perturbed_weights_and_restores_them(tmp_path):
    """One SAM step by hand: the update uses the gradient at w + rho g/|g|, and the weights it starts
    from are the unperturbed ones (checked against a step computed the long way)."""
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "v"), "--sam", "0.5", "--drop-path", "0", *TINY])
    train, val, task = vlm.load_data(args)
    model, tok = vlm.build_vlm(args, vlm.data_texts(train))
    from nanoseek.model.vision import VisionConfig
    from nanoseek.train.vlm_data import make_batch

    batch = make_batch(train[:8], tok, VisionConfig.from_dict(model.config.vision_config))
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]

    def grads_at(weights):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        model.zero_grad(set_to_none=True)
        vlm.batch_loss(model, batch, args, np.random.default_rng(0))[0].backward()
        return [p.grad.detach().clone() if p.grad is not None else None for p in params]

    model.train()
    g0 = grads_at(start)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g0 if g is not None]))
    perturbed = [w + 0.5 * g / norm if g is not None else w for w, g in zip(start, g0)]
    want = grads_at(perturbed)
    grads_at(start)  # back at the start, with the plain gradients in .grad
    states = (np.random.default_rng(0).bit_generator.state, vlm.torch_rng_states(model.device))
    vlm.sharpness_aware_grads(model, batch, params, args, np.random.default_rng(0), states)
    for p, w, g in zip(params, start, want):
        assert torch.allclose(p.detach(), w, atol=1e-6)  # the weights are restored
        if g is not None:
            assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4)
    assert any(g is not None and not torch.allclose(g, g0_) for g, g0_ in zip(want, g0) if g0_ is not None)


def test_train_vlm_with_sam_runs_and_lowers_the_loss(tmp_path):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "2", "--steps", "16",
                  "--eval-every", "8", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--sam", "0.05", *TINY])
    info = vlm.run_training(args)
    losses = [h["train_loss"] for h in info["history"]]
    assert losses[-1] < 0.6 * losses[0], losses


def _tiny_model(tmp_path, *flags):
    from nanoseek.model.vision import VisionConfig
    from nanoseek.train.vlm_data import make_batch

    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "v"), *TINY, "--vision-layers", "2", *flags])
    train, _, _ = vlm.load_data(args)
    model, tok = vlm.build_vlm(args, vlm.data_texts(train))
    for block in model.vision.encoder.blocks:
        block.drop_path = args.drop_path
    batch = make_batch(train[:8], tok, VisionConfig.from_dict(model.config.vision_config))
    return model, batch, args


def test_sam_repeats_the_first_pass_random_draws(tmp_path):
    """With drop-path on, the second pass must drop the same branches: at a vanishing radius the SAM
    gradient is the plain one (a new drop-path draw made it differ by 0.02)."""
    model, batch, args = _tiny_model(tmp_path, "--sam", "1e-12", "--drop-path", "0.5")
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    rng = np.random.default_rng(0)
    states = (rng.bit_generator.state, vlm.torch_rng_states(model.device))
    model.zero_grad(set_to_none=True)
    vlm.batch_loss(model, batch, args, rng)[0].backward()
    plain = [p.grad.clone() if p.grad is not None else None for p in params]
    weights = [p.detach().clone() for p in params]
    vlm.sharpness_aware_grads(model, batch, params, args, rng, states)
    for p, g, w in zip(params, plain, weights):
        assert torch.equal(p.detach(), w)  # restored exactly
        if g is not None:
            assert torch.allclose(p.grad, g, atol=1e-6), "the second pass drew other drop-path masks"


def test_sam_balances_the_router_on_the_first_pass_routing(tmp_path, monkeypatch):
    """The bias update counts the experts of the unperturbed pass, not of SAM's second one."""
    import copy

    from nanoseek.train.balance import moe_layers
    from nanoseek.train.optim import build_optimizer

    model, batch, args = _tiny_model(tmp_path, "--sam", "0.05")
    twin = copy.deepcopy(model)

    def second_pass_routes_all_to_expert_0(model, *rest):
        for _, moe in moe_layers(model):
            if moe.last_topk_idx is not None:
                moe.last_topk_idx = torch.zeros_like(moe.last_topk_idx)

    monkeypatch.setattr(vlm, "sharpness_aware_grads", second_pass_routes_all_to_expert_0)
    torch.manual_seed(0)  # the same drop-path draws in both
    vlm.train_step(model, batch, build_optimizer(model, lr=0.0, weight_decay=0.0), 0.0, args, np.random.default_rng(0))
    args.sam = 0.0
    torch.manual_seed(0)
    vlm.train_step(twin, batch, build_optimizer(twin, lr=0.0, weight_decay=0.0), 0.0, args, np.random.default_rng(0))
    for (_, a), (_, b) in zip(moe_layers(model), moe_layers(twin)):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
