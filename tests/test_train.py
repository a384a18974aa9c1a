"""Pretraining: the loss falls, MTP is trained, loss-free balancing balances, schedules, FLOP counts."""

import math

import pytest
import torch

import nanoseek
from nanoseek.data import PackedLoader, TokenStream, prepare_shards, val_batches
from nanoseek.model.moe import MoE
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import balance
from nanoseek.train.metrics import forward_flops_per_token
from nanoseek.train.optim import build_optimizer, lr_at, param_groups
from nanoseek.train.loss import IGNORE
from nanoseek.train.trainer import Settings, Trainer, unpadded



pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = "".join(f"def square_{i}(x):\n    return x * x + {i}\n\n" for i in range(400))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    (root / "code.txt").write_text(TEXT)
    tok = Tokenizer.train([TEXT], vocab_size=300)
    prepare_shards(root / "code.txt", tok, root / "data", val_fraction=0.1)
    return tok, root / "data"


def make_trainer(shards, tmp_path, **overrides):
    tok, data = shards
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    settings = Settings(**{"batch_size": 8, "seq_len": 64, "steps": 20, "lr": 3e-3, "warmup_steps": 3, "log_every": 1,
                           "eval_every": 0, "dtype": "fp32", **overrides})
    loader = PackedLoader(TokenStream(data, "train"), settings.batch_size, settings.seq_len, seed=0)
    val = val_batches(TokenStream(data, "val"), settings.batch_size, settings.seq_len, 2)
    return Trainer(nanoseek.build_model(config, seed=0), settings, tok, loader, val, tmp_path)


def test_twenty_steps_lower_the_loss_and_train_mtp(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path)
    before = trainer.evaluate()
    stats = [trainer.train_step() for _ in range(20)]
    after = trainer.evaluate()
    losses, mtp = [s["loss"] for s in stats], [s["mtp_loss"] for s in stats]
    assert all(math.isfinite(x) for x in losses + mtp)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 1.0, losses
    assert sum(mtp[-3:]) / 3 < sum(mtp[:3]) / 3 - 1.0, mtp  # the MTP loss is there and falls
    assert after["val_loss"] < before["val_loss"] - 1.0
    assert after["val_mtp_loss"] < before["val_mtp_loss"] - 1.0
    assert stats[-1]["balance_loss"] > 0


def test_mtp_gradients_reach_the_mtp_module_only_with_mtp_loss(shards, tmp_path):
    for depth, expect in ((1, True), (0, False)):
        trainer = make_trainer(shards, tmp_path, mtp_depth=depth, steps=1)
        before = trainer.model.mtp[0].eh_proj.weight.detach().clone()
        trainer.train_step()
        changed = not torch.equal(before, trainer.model.mtp[0].eh_proj.weight)
        assert changed == expect


def test_bias_update_balances_a_skewed_router():
    """Route every token to experts 0 and 1, then apply the loss-free update: load evens out."""
    config = nanoseek.get_preset("test").replace(n_group=1, topk_group=1)
    moe = MoE(config)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)  # router scores spread as in a trained model
    direction = torch.randn(config.hidden_size)
    direction /= direction.norm()
    with torch.no_grad():
        moe.gate.weight[:2] += 3.0 * direction  # experts 0 and 1 score high for every token
    imbalance = []
    for _ in range(200):
        x = torch.randn(512, config.hidden_size) * 0.3 + direction  # a fresh batch each step
        with torch.no_grad():
            moe(x)
        counts = balance.routed_counts(moe)
        imbalance.append(balance.load_imbalance(counts))
        balance.update_router_bias(moe, counts, gamma=0.005)
    E, K = config.n_routed_experts, config.num_experts_per_tok
    assert imbalance[0] > 0.9 * E / K  # max/mean near 4: nearly all tokens on 2 of 8 experts
    # the sign update keeps jittering around balance; on average it sits close to 1
    assert sum(imbalance[-20:]) / 20 < 1.3, imbalance[-20:]
    bias = moe.gate.e_score_correction_bias
    assert bias[:2].max() < bias[2:].min()  # the overloaded experts were pushed down


def test_sequence_balance_loss_is_minimal_when_balanced():
    config = nanoseek.get_preset("test").replace(n_group=1, topk_group=1)
    moe = MoE(config)
    E, K, T = config.n_routed_experts, config.num_experts_per_tok, 8
    # uniform scores and every expert used equally: f_i = 1 and P_i = 1/E, so the loss is 1
    moe.last_scores = torch.full((T, E), 0.5)
    moe.last_topk_idx = torch.arange(T * K).remainder(E).view(T, K)
    assert float(balance.sequence_balance_loss(moe, 1)) == pytest.approx(1.0)
    # all tokens on experts 0..K-1 that also take the score mass: the loss grows
    scores = torch.full((T, E), 0.01)
    scores[:, :K] = 0.9
    moe.last_scores, moe.last_topk_idx = scores, torch.arange(K).expand(T, K)
    assert float(balance.sequence_balance_loss(moe, 1)) > 3.0


def test_bias_moves_during_training_and_is_saved(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, steps=3, save_every=0)
    trainer.train_step()
    biases = [moe.gate.e_score_correction_bias.clone() for _, moe in trainer.moes]
    assert all(b.abs().max() == pytest.approx(1e-3) for b in biases)
    path = trainer.save()
    loaded = nanoseek.load(path)
    assert torch.equal(loaded.model.layers[1].mlp.gate.e_score_correction_bias, biases[0])


def test_no_weight_decay_on_norms_and_biases():
    model = nanoseek.build_model(nanoseek.get_preset("test"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is model.model.norm.weight for p in no_decay["params"])
    assert any(p is model.lm_head.weight for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])


def test_schedules():
    kw = dict(max_lr=1.0, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(99, **kw) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(55, **kw) == pytest.approx(0.55, abs=0.01)  # cosine midpoint
    wsd = dict(kw, schedule="wsd", decay_frac=0.2)
    assert lr_at(79, **wsd) == 1.0 and lr_at(90, **wsd) == pytest.approx(0.55) and lr_at(100, **wsd) == pytest.approx(0.1)


def test_flops_count_matches_parameter_count():
    """Without attention scores, forward FLOPs are 2 x activated matmul weights (embeddings excluded)."""
    from nanoseek.model.params import count_parameters

    config = nanoseek.get_preset("tiny").replace(num_nextn_predict_layers=0)
    counts = count_parameters(config)
    norms = counts["parts"]["norms"] + config.num_hidden_layers * (config.q_lora_rank + config.kv_lora_rank)
    biases = sum(config.n_routed_experts for i in range(config.num_hidden_layers) if config.is_moe_layer(i))
    matmul = counts["activated"] - counts["parts"]["embeddings"] - norms - biases
    attention = config.num_hidden_layers * 2 * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * 1
    assert forward_flops_per_token(config, seq_len=1) == pytest.approx(2 * matmul + attention)


def test_bf16_autocast_and_activation_checkpointing_train(shards, tmp_path):
    ref = make_trainer(shards, tmp_path, steps=3)
    ckpt = make_trainer(shards, tmp_path, steps=3, activation_checkpointing=True)
    for _ in range(3):
        a, b = ref.train_step(), ckpt.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)  # recomputation gives the same numbers
    bf16 = make_trainer(shards, tmp_path, dtype="bf16")
    losses = [bf16.train_step()["loss"] for _ in range(12)]
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_matches_torch(dtype):
    import torch.nn.functional as F

    from nanoseek.train.loss import IGNORE, cross_entropy_sum

    torch.manual_seed(0)
    logits = (torch.randn(3, 300, 97) * 3).to(dtype).requires_grad_()  # 900 rows: chunks of 256 and a remainder
    targets = torch.randint(0, 97, (3, 300))
    targets[:, ::5] = IGNORE
    ours = cross_entropy_sum(logits, targets)
    (grad,) = torch.autograd.grad(ours * 0.5, logits)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.5, logits)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert grad[:, ::5].abs().max() == 0  # ignored targets get no gradient


def test_mtp_agreement_counts_only_scored_tokens(shards, tmp_path):
    """SFT val batches: prompts and padding are IGNORE; agreement is a fraction of the scored tokens."""
    trainer = make_trainer(shards, tmp_path)
    with torch.no_grad():
        trainer.model.lm_head.weight.zero_()  # all logits equal: main model and draft agree everywhere
    inputs = torch.randint(8, 256, (2, 16))
    targets = torch.full((2, 16), IGNORE)
    targets[:, 12:] = inputs[:, 12:]
    trainer.val = [(inputs, targets)]
    assert trainer.evaluate()["val_mtp_agree"] == 1.0


def test_time_budget_of_a_resumed_run_counts_only_this_process(shards, tmp_path, monkeypatch):
    """Resumed at step 95 with 50 of 60 s spent; 5 steps here took 5 s: about 5 more steps fit."""
    import nanoseek.train.trainer as trainer_module

    trainer = make_trainer(shards, tmp_path, steps=None, minutes=1.0)
    clock = [1000.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: clock[0])
    trainer.elapsed, trainer._first_step, trainer.step = 50.0, 95, 100
    trainer._started = clock[0] - 5.0
    assert trainer._steps_for_budget() == 105


def test_save_removes_what_a_killed_save_left(shards, tmp_path):
    trainer = make_trainer(shards, tmp_path, steps=3)
    stale = [".step-000001.partial", "..step-000001.partial.tmp-ab12cd", ".step-000001.old-4242",
             "..step-000002.partial.old-77"]
    for name in stale:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    trainer.train_step()
    trainer.save()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step-")] == ["step-000001"]


def test_padding_is_not_expert_load():
    """Routing counts and the sequence balance loss of a right-padded batch equal those of its real tokens."""
    config = nanoseek.get_preset("test").replace(n_group=1, topk_group=1)
    moe = MoE(config)
    K, T = config.num_experts_per_tok, 6
    torch.manual_seed(0)
    with torch.no_grad():  # MoE's own parameters start uninitialised (torch.empty): NaNs some runs
        for param in moe.parameters():
            param.normal_(0, 0.02)
    x = torch.randn(2, T, config.hidden_size)
    lengths = [6, 3]
    real = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        moe(x)
    counts = balance.routed_counts(moe, balance.token_mask(moe, real))
    loss = balance.sequence_balance_loss(moe, 2, balance.token_mask(moe, real))
    assert int(counts.sum()) == sum(lengths) * K
    expect_counts, expect_losses = 0, []
    for row, n in enumerate(lengths):
        with torch.no_grad():
            moe(x[row : row + 1, :n])
        expect_counts = expect_counts + balance.routed_counts(moe)
        expect_losses.append(balance.sequence_balance_loss(moe, 1))
    assert torch.equal(counts, expect_counts)
    assert float(loss) == pytest.approx(float(sum(expect_losses) / 2), rel=1e-5)
    # an MTP module at depth 1 routes T - 1 tokens a row: the mask drops the ones made from padding
    moe.last_topk_idx = torch.zeros(2 * (T - 1), K, dtype=torch.long)
    assert balance.token_mask(moe, real).tolist() == real[:, 1:].tolist()


def test_padded_batches_train_the_router_bias_on_real_tokens_only(shards, tmp_path):
    tok, _ = shards

    class Padded:
        pad_id = tok.pad_id  # as sft.ChatLoader: the trainer masks padding only for a loader that pads

        def next_batch(self):
            inputs = torch.randint(8, tok.vocab_size, (2, 16))
            inputs[1, 5:] = tok.pad_id
            targets = torch.where(inputs == tok.pad_id, IGNORE, inputs)
            return inputs, targets

    trainer = make_trainer(shards, tmp_path, steps=1)
    trainer.loader = Padded()
    stats = trainer.train_step()
    K = trainer.model.config.num_experts_per_tok
    main_layers = [c for (i, _), c in zip(trainer.moes, stats["expert_counts"]) if i < trainer.model.config.num_hidden_layers]
    mtp_layers = [c for (i, _), c in zip(trainer.moes, stats["expert_counts"]) if i >= trainer.model.config.num_hidden_layers]
    assert main_layers and all(int(c.sum()) == (16 + 5) * K for c in main_layers)
    assert mtp_layers and all(int(c.sum()) == (15 + 4) * K for c in mtp_layers)


def test_only_a_trailing_run_of_the_pad_token_is_padding():
    """DeepSeek's tokenizers pad with their end-of-sentence token, which also ends every turn."""
    eos = 1
    inputs = torch.tensor([[5, eos, 6, 7, eos, eos, eos], [5, eos, 6, 7, 8, 9, 4], [eos, eos, eos, eos, eos, eos, eos]])
    real = unpadded(inputs, eos)
    assert real.tolist() == [[True, True, True, True, False, False, False], [True] * 7, [False] * 7]
    assert unpadded(inputs[1:2], eos) is None  # no row ends in padding: nothing to mask


def test_the_optimizer_is_fused_adamw_with_deepseeks_settings_and_matches_the_foreach_form():
    """The fused kernel is 5x faster on the CPU; it must make the same update as the foreach form."""
    model = nanoseek.build_model(nanoseek.get_preset("test"), seed=0)
    reference = nanoseek.build_model(nanoseek.get_preset("test"), seed=0)
    optimizer = build_optimizer(model, lr=1e-3)
    assert optimizer.defaults["fused"] and optimizer.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    foreach = torch.optim.AdamW(param_groups(reference, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=True)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(model.parameters(), reference.parameters()):
            a.grad = torch.randn(a.shape, generator=generator) * 1e-2
            b.grad = a.grad.clone()
        optimizer.step()
        foreach.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert any((a != b).any() for a, b in zip(model.parameters(), nanoseek.build_model(nanoseek.get_preset("test"), seed=0).parameters()))
