"""Images and VLM training at their edges: base64 that looks like an over-long file name, malformed
EXIF, a literal <image> in a text request batched with an image request, images in system messages,
less data than a batch, training without validation data, augmentation of any image mode, tRNS
transparency, and MedMNIST files that are not .npz archives or have empty splits."""

import argparse
import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import nanoseek
from nanoseek.cli import main
from nanoseek.image import ImageError, chat_prompt, load_image, message_images, preprocess
from nanoseek.inference import Engine
from nanoseek.model.vision import VisionConfig, image_token_count
from nanoseek.train import vlm as train_vlm
from nanoseek.train.vlm_data import Example, VLMDataError, load_medmnist, load_views, read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = VisionConfig(image_size=8, patch_size=4, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                     num_attention_heads=1, max_tiles=1)
TINY = ["--image-size", "8", "--patch-size", "2", "--conv-stem", "4", "--vision-width", "32", "--vision-layers", "1",
        "--vision-heads", "2"]


def picture(h=16, w=16, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def encoded(image: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def image_message(image, text="What?", role="user"):
    return {"role": role, "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}


def test_base64_and_long_names_are_not_taken_for_file_names(tmp_path):
    # a dark BMP's base64 has no '/' for over 255 characters: one path segment too long for the OS
    text = base64.b64encode(encoded(Image.new("RGB", (16, 16)), "BMP")).decode()
    assert max(len(s) for s in text.split("/")) > 255
    assert load_image(text).size == (16, 16)
    with pytest.raises(ImageError, match="no such image file"):
        load_image("x" * 300 + ".png")
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"image": text, "messages": [{"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}) + "\n")
    (example,) = read_jsonl(data)
    assert example.image == text and load_views(example, SMALL).views.shape == (1, 3, 8, 8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_a_malformed_exif_block_is_ignored(fmt):
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    loaded = load_image(encoded(image, fmt, exif=b"garbage-not-tiff", lossless=True))
    assert loaded.size == (8, 6) and loaded.convert("RGB").getpixel((0, 0)) == (10, 20, 30)


def test_a_stray_image_token_is_refused_alone_and_the_batch_runs_on(vlm):
    model, tok = vlm
    literal = [{"role": "user", "content": "what does the tag <image> mean in HTML?"}]
    with pytest.raises(ImageError, match="1 <image> mark"):
        chat_prompt(tok, literal, model.config)
    stray = tok.encode_chat(literal)  # as /v1/completions token ids would send it
    assert stray.count(tok.image_id) == 1
    ids, images = chat_prompt(tok, [image_message(picture())], model.config)
    engine = Engine(model, max_batch_size=4, max_seq_len=256)
    with pytest.raises(ValueError, match="but no images"):
        engine.submit(stray, max_new_tokens=3)
    good = engine.submit(ids, max_new_tokens=3, images=images)
    text = engine.submit(tok.encode_chat([{"role": "user", "content": "hi"}]), max_new_tokens=3)
    engine.run_until_done()
    assert good.finish_reason == text.finish_reason == "length"

    # a text model has no image positions: there "<image>" is an ordinary token
    text_model = nanoseek.build_model(nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size), seed=0).eval()
    assert chat_prompt(tok, literal, text_model.config) == (stray, [])
    engine = Engine(text_model, max_batch_size=1, max_seq_len=128)
    request = engine.submit(stray, max_new_tokens=2)
    engine.run_until_done()
    assert request.finish_reason == "length"


def test_server_refuses_bad_requests_with_4xx_and_serves_the_rest(vlm, tmp_path):
    from fastapi.testclient import TestClient

    from nanoseek.serve.server import create_app
    from nanoseek.serve.textgen import load_generator

    model, tok = vlm
    nanoseek.save(model, tmp_path / "vlm", extra_files=tok.files())
    app = create_app(load_generator(tmp_path / "vlm", max_batch_size=2, max_seq_len=256), model_name="vlm",
                     accepts_images=True)

    def chat(content):
        return {"model": "vlm", "max_tokens": 2, "messages": [{"role": "user", "content": content}]}

    def image_part(**save):
        url = "data:image/png;base64," + base64.b64encode(encoded(picture(), **save)).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    with TestClient(app, raise_server_exceptions=False) as http:
        reply = http.post("/v1/chat/completions", json=chat([image_part(exif=b"garbage-not-tiff"), {"type": "text", "text": "hi"}]))
        assert reply.status_code == 200, reply.text
        reply = http.post("/v1/chat/completions", json=chat("what is the <image> tag?"))
        assert reply.status_code == 400 and "<image> mark" in reply.json()["error"]["message"]
        ids = tok.encode("what is the <image> tag?", bos=True)
        assert tok.image_id in ids
        reply = http.post("/v1/completions", json={"model": "vlm", "max_tokens": 2, "prompt": ids})
        assert reply.status_code == 400 and "no images" in reply.json()["error"]["message"]
        reply = http.post("/v1/chat/completions", json=chat([image_part(), {"type": "text", "text": "hi"}]))
        assert reply.status_code == 200, reply.text


def test_images_in_system_messages_come_first_as_the_prompt_renders_them(vlm):
    model, tok = vlm
    a, b = picture(16, 16, seed=1), picture(16, 48, seed=2)  # b is tiled: a longer run than a's
    messages = [image_message(a, "Compare."), image_message(b, "Reference.", role="system")]
    assert tok.render_chat(messages).index("Reference.") < tok.render_chat(messages).index("Compare.")
    assert message_images(messages) == [b, a]
    ids, images = chat_prompt(tok, messages, model.config)
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    assert [im.tiles for im in images] == [(1, 3), (0, 0)]
    first, n = ids.index(tok.image_id), image_token_count(vcfg, (1, 3))
    assert ids[first : first + n] == [tok.image_id] * n and ids[first + n] != tok.image_id
    with torch.no_grad():  # the system message's run holds its own image's embeddings
        together = model.embed_multimodal(torch.tensor([ids]), images)[0]
        alone = model.vision(images[:1])
    torch.testing.assert_close(together[first : first + n], alone)


def jsonl_data(tmp_path, n):
    for i in range(n):
        picture(8, 8, seed=i).save(tmp_path / f"{i}.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "messages": [
        {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "dots"}]}) + "\n"
        for i in range(n)))
    return path


def parse(argv):
    parser = argparse.ArgumentParser()
    train_vlm.add_arguments(parser)
    return parser.parse_args(argv)


def test_train_vlm_refuses_a_batch_larger_than_its_data(vlm, tmp_path, capsys):
    model, tok = vlm
    train = [Example(picture(seed=i), [{"role": "user", "content": "<image>\nq"}, {"role": "assistant", "content": "a"}])
             for i in range(3)]
    args = argparse.Namespace(batch_size=32, augment=False)
    vcfg = VisionConfig.from_dict(model.config.vision_config)
    with pytest.raises(VLMDataError, match="--batch-size 32 is more than the 3 training examples"):
        train_vlm.batches(train, None, tok, vcfg, args, torch.Generator(), np.random.default_rng(0), torch.device("cpu"))
    data = jsonl_data(tmp_path, 3)
    assert main(["train-vlm", "--data", str(data), "--out", str(tmp_path / "out"), "--batch-size", "4", *TINY]) == 2
    assert "--batch-size 4 is more than the 3 training examples" in capsys.readouterr().err


def test_without_validation_data_the_last_evaluation_is_kept(tmp_path):
    data = jsonl_data(tmp_path, 4)
    args = parse(["--data", str(data), "--out", str(tmp_path / "out"), "--projector-steps", "1", "--steps", "3",
                  "--eval-every", "1", "--batch-size", "2", "--vocab-size", "300", *TINY])
    info = train_vlm.run_training(args)
    assert [(h["stage"], h["step"]) for h in info["history"]] == [(1, 1), (2, 1), (2, 2), (2, 3)]
    assert (info["best"]["stage"], info["best"]["step"]) == (2, 3)
    # with validation metrics the best score still wins
    assert not train_vlm.improves({"val_loss": 2.0}, {"val_loss": 1.0}) and train_vlm.improves({"val_loss": 1.0}, {"val_loss": 2.0})


def test_augmentation_takes_palette_16_bit_and_1_bit_images():
    rgb = picture(8, 8)
    gray16 = Image.fromarray((np.random.default_rng(0).random((8, 8)) * 65535).astype(np.uint16))
    for image in (encoded(rgb.convert("P")), encoded(gray16), encoded(rgb.convert("1")),
                  encoded(rgb.convert("P"), "GIF", transparency=0)):
        views = load_views(Example(image, []), SMALL, np.random.default_rng(0)).views
        assert views.shape == (1, 3, 8, 8) and torch.isfinite(views).all()


def test_a_trns_colour_is_transparent_in_l_p_and_rgb_images():
    """A tRNS colour in an L, P or RGB image marks transparent pixels as an alpha channel does: they take
    the padding colour. (A 16-bit image loses its tRNS colour in the stretch to 8 bits: not handled.)"""
    gray = np.zeros((8, 8), np.uint8)
    gray[:, 4:] = 200  # the left half is black, the transparent colour
    alpha = np.where(gray == 0, 0, 255).astype(np.uint8)
    reference = preprocess(encoded(Image.fromarray(np.stack([gray, alpha], -1), "LA")), SMALL).views
    assert reference[0, :, :, 0].abs().max() < 0.01  # the padding colour normalises to about zero
    for image in (Image.fromarray(gray), Image.fromarray(gray).convert("P"), Image.fromarray(gray).convert("RGB")):
        trns = (0, 0, 0) if image.mode == "RGB" else 0
        assert torch.equal(preprocess(encoded(image, transparency=trns), SMALL).views, reference), image.mode


def test_medmnist_loader_refuses_npy_files_and_empty_splits(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(VLMDataError, match="not a .npz archive"):
        load_medmnist(tmp_path / "x.npy", "train")
    rng = np.random.default_rng(0)
    arrays = {"train_images": rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), "train_labels": np.arange(6).reshape(-1, 1) % 3,
              "val_images": np.zeros((0, 8, 8), np.uint8), "val_labels": np.zeros((0, 1), np.int64),
              "test_images": rng.integers(0, 255, (2, 8, 8), dtype=np.uint8), "test_labels": np.array([[0], [1]])}
    np.savez(tmp_path / "empty_val.npz", **arrays)
    with pytest.raises(VLMDataError, match="the val split is empty"):
        load_medmnist(tmp_path / "empty_val.npz", "val")
    images, labels, task = load_medmnist(tmp_path / "empty_val.npz", "test")  # the empty split is not asked for
    assert images.shape == (2, 8, 8) and len(task.class_names) == 3


def test_chat_with_a_vision_model_skips_a_literal_image_mark_and_goes_on(vlm, tmp_path, capsys, monkeypatch):
    """The submit-time check refuses a stray <image>; the terminal chat used to end with a traceback."""
    model, tok = vlm
    nanoseek.save(model, tmp_path / "vlm", extra_files=tok.files())
    monkeypatch.setattr("sys.stdin", io.StringIO("what is <image> in html\nwhat\n/exit\n"))
    assert main(["chat", "--model", str(tmp_path / "vlm"), "--max-tokens", "2", "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "but no images" in out and "the message was not sent" in out and out.count("tokens in,") == 1
