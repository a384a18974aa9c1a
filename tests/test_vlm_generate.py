"""Generation with images: the engine's cached decode of an image prompt matches full recomputation,
requests are checked against their images, and `nanoseek generate --image` runs end to end."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import nanoseek
from nanoseek.cli import main
from nanoseek.image import chat_prompt
from nanoseek.inference import Engine, generate


def picture(h=16, w=16, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


def reference_greedy(model, ids, images, n):
    """Greedy continuation by recomputing the whole sequence each step (no cache)."""
    with torch.no_grad():
        embeds = model.embed_multimodal(torch.tensor([ids]), images)
        out = []
        for _ in range(n):
            token = int(model(inputs_embeds=embeds)[0, -1].argmax())
            out.append(token)
            embeds = torch.cat([embeds, model.embed(torch.tensor([[token]]))], dim=1)
    return out


def test_cached_generation_with_images_matches_recomputation(vlm):
    model, tok = vlm
    prompts, images = [], []
    for i, size in enumerate([(16, 16), (16, 40)]):  # the second image is tiled: global view + 1x3 tiles
        messages = [{"role": "user", "content": [{"type": "image", "image": picture(*size, seed=i)},
                                                 {"type": "text", "text": "What does this image show?"}]}]
        ids, row = chat_prompt(tok, messages, model.config)
        prompts.append(ids)
        images.append(row)
    assert images[1][0].tiles == (1, 3) and len(prompts[1]) > len(prompts[0])
    out = generate(model, prompts, max_new_tokens=6, stop_token_ids=[], images=images)
    for ids, row, tokens in zip(prompts, images, out):
        assert tokens == reference_greedy(model, ids, row, 6)
    # and the images matter: the same prompt with another picture continues differently
    other = chat_prompt(tok, [{"role": "user", "content": [{"type": "image", "image": picture(seed=7)},
                                                         {"type": "text", "text": "What does this image show?"}]}],
                        model.config)
    with torch.no_grad():
        a = model(inputs_embeds=model.embed_multimodal(torch.tensor([prompts[0]]), images[0]))[0, -1]
        b = model(inputs_embeds=model.embed_multimodal(torch.tensor([other[0]]), other[1]))[0, -1]
    assert not torch.allclose(a, b)


def test_engine_checks_image_requests(vlm):
    model, tok = vlm
    ids, row = chat_prompt(tok, [{"role": "user", "content": [{"type": "image", "image": picture()}]}], model.config)
    engine = Engine(model, max_batch_size=1, max_seq_len=128)
    with pytest.raises(ValueError, match="image-token positions"):
        engine.submit(ids[:-3] + ids[-2:], max_new_tokens=2, images=row)  # one image position short
    text_model = nanoseek.build_model(nanoseek.get_preset("test").replace(vocab_size=tok.vocab_size))
    with pytest.raises(ValueError, match="no vision encoder"):
        Engine(text_model, max_batch_size=1, max_seq_len=128).submit(ids, max_new_tokens=2, images=row)


def test_generate_cli_takes_an_image(vlm, tmp_path, capsys):
    model, tok = vlm
    nanoseek.save(model, tmp_path / "vlm", extra_files=tok.files())
    buf = io.BytesIO()
    picture().save(buf, "PNG")
    (tmp_path / "scan.png").write_bytes(buf.getvalue())
    argv = ["generate", str(tmp_path / "vlm"), "--image", str(tmp_path / "scan.png"), "--prompt", "What does this image show?",
            "--max-new-tokens", "4", "--ignore-eos"]
    assert main(argv) == 0
    capsys.readouterr()
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    assert main(argv[:3] + [str(tmp_path / "bad.png")] + argv[4:]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_server_answers_an_image_request(vlm, tmp_path):
    """OpenAI-style image_url content parts reach the model: the reply is what generate() gives for the
    same prompt and image, and a different image changes it; a broken image is a 400."""
    import base64

    from fastapi.testclient import TestClient

    from nanoseek.serve.server import create_app
    from nanoseek.serve.textgen import load_generator

    model, tok = vlm
    nanoseek.save(model, tmp_path / "vlm", extra_files=tok.files())
    generator = load_generator(tmp_path / "vlm", max_batch_size=2, max_seq_len=256)
    app = create_app(generator, model_name="vlm", accepts_images=True)

    black, white = Image.new("RGB", (16, 16)), Image.new("RGB", (16, 16), (255, 255, 255))

    def request(image):
        buf = io.BytesIO()
        image.save(buf, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return {"model": "vlm", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "What does this image show?"}]}]}

    def expected(image):
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "What does this image show?"}]}]
        ids, row = chat_prompt(tok, messages, model.config)
        return generate(model, [ids], max_new_tokens=6, stop_token_ids=[], images=[row])[0]

    with TestClient(app) as client:
        for image in (black, white):
            reply = client.post("/v1/chat/completions", json=request(image))
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == tok.decode(expected(image), skip_special_tokens=True)
            assert reply.json()["usage"]["completion_tokens"] == 6
        assert expected(black) != expected(white)  # this random model's answer depends on the image
        broken = request(black)
        broken["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,iVBORw0KGgo="
        reply = client.post("/v1/chat/completions", json=broken)
        assert reply.status_code == 400 and "error" in reply.json()
        assert client.post("/v1/chat/completions", json=request(white)).status_code == 200  # and still serves
