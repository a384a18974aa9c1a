"""Image-path fixes of stop 19: a JSONL `label` that is not a class index is named by line (it failed
deep in training), `eval-vlm --limit 0` is refused (it evaluated every image), and so is a
`train-vlm` run of no steps (it crashed at the end)."""

import json

import numpy as np
import pytest
from PIL import Image

from nanoseek.cli import main
from nanoseek.train.vlm_data import VLMDataError, read_jsonl


def write_jsonl(tmp_path, label):
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    record = {"image": "a.png", "messages": [{"role": "user", "content": "What?"},
                                             {"role": "assistant", "content": "nothing"}], "label": label}
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    return tmp_path / "data.jsonl"


@pytest.mark.parametrize("label", ["malignant", -1, 1.5, True])
def test_a_label_that_is_not_a_class_index_is_named_by_line(tmp_path, label):
    with pytest.raises(VLMDataError, match=r"data.jsonl:1: 'label' must be a class index"):
        read_jsonl(write_jsonl(tmp_path, label))


def test_a_class_index_label_and_no_label_are_read(tmp_path):
    assert read_jsonl(write_jsonl(tmp_path, 1))[0].label == 1
    assert read_jsonl(write_jsonl(tmp_path, None))[0].label is None


def test_eval_vlm_refuses_a_limit_below_1_before_loading(tmp_path, capsys):
    assert main(["eval-vlm", "--model", str(tmp_path / "none"), "--data", "x.npz", "--limit", "0"]) == 2
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("steps", [["--projector-steps", "0", "--steps", "0"], ["--steps", "-1"]])
def test_train_vlm_refuses_a_run_without_steps(tmp_path, capsys, steps):
    data = write_jsonl(tmp_path, None)
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "out"), *steps]) == 2  # was a traceback
    assert "each must be at least 0, and together at least 1" in capsys.readouterr().err


def test_data_urls_are_read_case_insensitively_as_browsers_do():
    import base64
    import io

    from nanoseek.image import decode_data_url

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(buffer, format="PNG")
    payload = base64.b64encode(buffer.getvalue()).decode()
    for prefix in ("data:image/png;base64,", "DATA:IMAGE/PNG;BASE64,", "data:image/png; base64,"):
        assert decode_data_url(prefix + payload) == buffer.getvalue()  # upper case was refused


def test_mixup_skips_batches_whose_tile_grids_differ_with_views_of_one_shape():
    import types

    import torch

    import nanoseek
    from nanoseek.model.vision import ImageInput
    from nanoseek.train import vlm as train_vlm
    from nanoseek.train.vlm_data import Batch

    vision = dict(image_size=8, patch_size=2, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                  num_attention_heads=2, max_tiles=4)
    model = nanoseek.build_model(nanoseek.get_preset("test").replace(vision_config=vision, image_token_id=5), seed=0)
    # 1x2 and 2x1 tiles: three views each, but runs of different lengths (a row got another's run)
    images = [ImageInput(torch.randn(3, 3, 8, 8), (1, 2)), ImageInput(torch.randn(3, 3, 8, 8), (2, 1))]
    batch = Batch(torch.zeros(2, 30, dtype=torch.long), torch.full((2, 30), -100), images)
    assert train_vlm.mixup_loss(model, batch, types.SimpleNamespace(mixup=0.4), np.random.default_rng(0)) is None


def test_the_engine_refuses_an_image_of_other_views_before_it_joins_a_batch(vlm):
    import torch

    from nanoseek.inference import Engine
    from nanoseek.model.vision import ImageInput, image_token_count

    model, _ = vlm
    engine = Engine(model, max_batch_size=2, max_seq_len=256)
    size = model.vision.vcfg.image_size
    wrong = ImageInput(torch.zeros(1, 3, size + 4, size + 4))  # not this tower's view size: failed the batch
    prompt = [1] + [model.config.image_token_id] * image_token_count(model.vision.vcfg) + [2]
    with pytest.raises(ValueError, match="is not this model's"):
        engine.submit(prompt, max_new_tokens=2, images=[wrong])


def test_upper_case_data_urls_load_everywhere():
    import base64
    import io

    from nanoseek.image import load_image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(buffer, format="PNG")
    url = "DATA:IMAGE/PNG;BASE64," + base64.b64encode(buffer.getvalue()).decode()
    assert load_image(url).size == (4, 4)  # taken for a file name ("no such image file")


def test_eval_vlm_on_a_text_model_is_a_one_line_error_with_status_2(tmp_path, capsys):
    import nanoseek

    nanoseek.save(nanoseek.build_model(nanoseek.get_preset("test"), seed=0), tmp_path / "text")
    assert main(["eval-vlm", "--model", str(tmp_path / "text"), "--data", "x.npz"]) == 2  # was SystemExit, status 1
    assert "not a vision-language model" in capsys.readouterr().err
