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
