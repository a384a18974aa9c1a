"""train-vlm --distill: a convolutional teacher trained on the labels, then DeiT's hard distillation
(the VLM learns its own reply and the reply naming the teacher's class for the same view)."""

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nanoseek.cli import main
from nanoseek.model.vision import VisionConfig
from nanoseek.train import vlm
from nanoseek.train.vlm_data import Example, make_batch
from nanoseek.train.vlm_teacher import ConvTeacher, Distiller

from test_vlm import TINY, fake_medmnist

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv):
    parser = argparse.ArgumentParser()
    vlm.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_teacher_rows_name_the_class_the_teacher_picks(tmp_path):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "v"), *TINY])
    train, _, task = vlm.load_data(args)
    model, tok = vlm.build_vlm(args, vlm.data_texts(train))
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    teacher = ConvTeacher(vcfg.num_channels, 2).eval()
    distiller = Distiller.build(teacher, 0.5, task, train[0], tok, vcfg, torch.device("cpu"))
    batch = make_batch(train[:6], tok, vcfg)
    for picked in (0, 1):  # a teacher whose head always says `picked`
        with torch.no_grad():
            teacher.head[1].weight.zero_()
            teacher.head[1].bias.copy_(torch.tensor([1.0, 0.0] if picked == 0 else [0.0, 1.0]))
        ids, targets = distiller.teacher_rows(batch)
        want = make_batch([Example(ex.image, task.messages(picked), picked) for ex in train[:6]], tok, vcfg)
        assert torch.equal(ids[:, : want.input_ids.shape[1]], want.input_ids)
        assert torch.equal(targets[:, : want.targets.shape[1]], want.targets)
        answer = tok.decode([t for t in targets[0].tolist() if t != -100])
        assert task.class_names[picked] in answer


def test_train_vlm_with_a_teacher_lowers_the_loss_and_says_how_the_teacher_did(tmp_path, capsys):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    args = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--projector-steps", "2", "--steps", "16",
                  "--eval-every", "8", "--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2", "--distill", "0.5",
                  "--teacher-epochs", "4", *TINY])
    info = vlm.run_training(args)
    assert "teacher: " in capsys.readouterr().out
    losses = [h["train_loss"] for h in info["history"]]
    assert losses[-1] < 0.6 * losses[0], losses


def test_distill_needs_class_labels_and_excludes_mixup(tmp_path, capsys):
    data = fake_medmnist(tmp_path / "breastmnist.npz")
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "v"), "--distill", "0.5", "--mixup", "0.2",
                 *TINY]) == 2
    assert "--distill and --mixup" in capsys.readouterr().err
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    record = {"image": "a.png", "messages": [{"role": "user", "content": "<image>\nWhat?"},
                                             {"role": "assistant", "content": "nothing"}]}
    (tmp_path / "d.jsonl").write_text((json.dumps(record) + "\n") * 8)
    assert main(["train-vlm", "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "j"), "--distill", "0.5",
                 "--batch-size", "4", *TINY]) == 2
    assert "--distill needs class labels" in capsys.readouterr().err
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "v"), "--distill", "1.5", *TINY]) == 2
    assert "--distill must be between 0 and 1" in capsys.readouterr().err
