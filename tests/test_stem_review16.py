"""Review of the convolutional stem (stop 16): the stem's flag checks apply to new towers only."""

import pytest

import nanoseek
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import vlm

from test_vlm import fake_medmnist, parse

pytestmark = pytest.mark.usefixtures("one_thread")


def test_stem_flag_checks_skip_an_existing_tower(tmp_path):
    """--init from a VLM ignores the vision flags (its tower is kept), so the default --conv-stem must
    not refuse a --patch-size or --patch-overlap left on the command line from the run that built the
    tower; a text model given to --init gets a new tower, and the checks."""
    tok = Tokenizer.train(["What does this image show? class 0 class 1"] * 4, vocab_size=300)
    config = nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size)
    nanoseek.save(nanoseek.build_model(config, seed=0), tmp_path / "text", extra_files=tok.files())
    data = fake_medmnist(tmp_path / "x.npz")
    old_tower = ["--image-size", "8", "--patch-size", "2", "--patch-overlap", "1", "--vision-width", "32",
                 "--vision-layers", "1", "--vision-heads", "2"]  # a pre-stem command line: no --conv-stem
    first = parse(["--data", str(data), "--out", str(tmp_path / "vlm"), "--init", str(tmp_path / "text"),
                   "--conv-stem", "", *old_tower])
    model, tok2 = vlm.build_vlm(first, [])
    nanoseek.save(model, tmp_path / "vlm", extra_files=tok2.files())
    again = parse(["--data", str(data), "--out", str(tmp_path / "vlm2"), "--init", str(tmp_path / "vlm"), *old_tower])
    vlm.check_settings(again)  # was: "--conv-stem 32,64 makes patches of 4 pixels but --patch-size is 2"
    assert vlm.build_vlm(again, [])[0].vision.vcfg.patch_overlap == 1  # the tower as it was
    new_tower = parse(["--data", str(data), "--out", str(tmp_path / "vlm3"), "--init", str(tmp_path / "text"), *old_tower])
    with pytest.raises(vlm.VLMDataError, match="--conv-stem 32,64 makes patches of 4 pixels"):
        vlm.check_settings(new_tower)
