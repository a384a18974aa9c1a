"""Vision tower: image-token layout and merge positions, the 2x2 projector merge, position-embedding
resizing, tiling choices, config checks, and checkpoints that keep the tower."""

import json

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.config import ConfigError
from nanoseek.model.vision import (
    ImageInput, MlpProjector, VisionConfig, candidate_resolutions, expand_image_tokens, image_token_count,
    merge_image_embeds, select_best_resolution,
)

IMAGE_ID = 7
VISION = dict(image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_tiles=4)


def tiny_vlm(**vision):
    config = nanoseek.get_preset("test").replace(vision_config={**VISION, **vision}, image_token_id=IMAGE_ID)
    return nanoseek.build_model(config, seed=0).eval()


def images(vcfg, *tiles, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = vcfg.image_size
    return [ImageInput(torch.randn(1 + r * c, 3, S, S, generator=g), (r, c)) for r, c in tiles]


def test_token_counts_follow_the_2d_layout():
    vcfg = VisionConfig(**VISION)  # 8x8 patches -> 4x4 merged tokens
    assert vcfg.grid_size == 8 and vcfg.merged_size == 4
    assert image_token_count(vcfg) == 4 * 5  # 4 rows of 4 tokens + newline
    # global, separator, then 2 tile rows of 4 token rows, each 3 tiles x 4 tokens + newline
    assert image_token_count(vcfg, (2, 3)) == 20 + 1 + 2 * 4 * (3 * 4 + 1)
    odd = VisionConfig(**{**VISION, "patch_size": 4})  # 4x4 grid -> 2x2; 16/3 -> 5x5 grid padded to 6x6 -> 3x3
    assert odd.merged_size == 2
    assert VisionConfig(**{**VISION, "image_size": 15, "patch_size": 3}).merged_size == 3


def test_expand_image_tokens_places_each_run():
    vcfg = VisionConfig(**VISION)
    ims = images(vcfg, (0, 0), (1, 2))
    ids = [1, IMAGE_ID, 2, 3, IMAGE_ID, 4]
    out = expand_image_tokens(ids, IMAGE_ID, ims, vcfg)
    n0, n1 = image_token_count(vcfg), image_token_count(vcfg, (1, 2))
    assert out == [1] + [IMAGE_ID] * n0 + [2, 3] + [IMAGE_ID] * n1 + [4]
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        expand_image_tokens(ids, IMAGE_ID, ims[:1], vcfg)


def test_merge_writes_image_rows_at_image_positions_only():
    model = tiny_vlm()
    vcfg = model.vision.vcfg
    ims = images(vcfg, (0, 0), (2, 1))
    ids = torch.tensor([expand_image_tokens([1, IMAGE_ID, 2, 3, IMAGE_ID, 4], IMAGE_ID, ims, vcfg)])
    with torch.no_grad():
        embeds = model.embed_multimodal(ids, ims)[0]
        text = model.embed(ids)[0]
        runs = model.vision(ims)
    is_image = ids[0] == IMAGE_ID
    assert torch.equal(embeds[~is_image], text[~is_image])  # text positions untouched
    assert torch.equal(embeds[is_image], runs)  # image positions hold the runs, in order
    n0 = image_token_count(vcfg)
    assert runs.shape[0] == n0 + image_token_count(vcfg, (2, 1))
    h = w = vcfg.merged_size
    newline, separator = model.vision.image_newline, model.vision.view_separator
    # first image: every (w+1)-th token is a newline
    glob = runs[:n0].view(h, w + 1, -1)
    assert torch.equal(glob[:, w], newline.expand(h, -1))
    # second image: global view, separator, then 2*h rows of (1*w tokens + newline)
    second = runs[n0:]
    assert torch.equal(second[h * (w + 1)], separator)
    local = second[h * (w + 1) + 1:].view(2 * h, w + 1, -1)
    assert torch.equal(local[:, w], newline.expand(2 * h, -1))
    # the local rows are the tiles' tokens: tile 1 (second row of tiles) fills rows h..2h
    with torch.no_grad():
        tokens = model.vision.projector(model.vision.encoder(ims[1].views))  # (3, h, w, D)
    assert torch.allclose(local[:h, :w], tokens[1], atol=1e-6)
    assert torch.allclose(local[h:, :w], tokens[2], atol=1e-6)
    assert torch.allclose(second[: h * (w + 1)].view(h, w + 1, -1)[:, :w], tokens[0], atol=1e-6)


def test_merge_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="3 image-token positions but its images fill 2"):
        merge_image_embeds(torch.zeros(1, 5, 4), torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool), torch.zeros(2, 4))


def test_projector_merges_each_2x2_group_into_one_token():
    vcfg = VisionConfig(**VISION)
    proj = MlpProjector(vcfg, 24)
    x = torch.randn(1, 6, 6, vcfg.hidden_size)
    base = proj(x)
    assert base.shape == (1, 3, 3, 24)
    x2 = x.clone()
    x2[0, 3, 4] += 1.0  # patch (3, 4) belongs to merged token (1, 2)
    changed = (proj(x2) - base).abs().amax(-1)[0] > 0
    assert changed.nonzero().tolist() == [[1, 2]]
    # the merged vector is DeepSeek-VL2's F.unfold order: (channel, row in group, column in group)
    first = proj.layers[0]
    manual = x[0, 0:2, 0:2].permute(2, 0, 1).reshape(-1)
    assert torch.allclose(F.linear(manual, first.weight, first.bias),
                          first(F.unfold(x.permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2))[0, 0], atol=1e-6)
    # odd grids are zero-padded: 5x5 -> 3x3 tokens
    assert proj(torch.randn(2, 5, 5, vcfg.hidden_size)).shape == (2, 3, 3, 24)


def test_position_embeddings_are_interpolated_for_other_grids():
    model = tiny_vlm()
    enc = model.vision.encoder
    assert enc.position_embeddings(8, 8) is enc.pos_embed
    resized = enc.position_embeddings(12, 6)
    assert resized.shape == (1, 72, VISION["hidden_size"])
    # interpolating to the same grid is the identity; to a grid and back is close for a smooth field
    grid = enc.pos_embed.reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 6), mode="bicubic", align_corners=False)
    assert torch.allclose(resized, expected.permute(0, 2, 3, 1).reshape(1, 72, -1), atol=1e-6)
    with torch.no_grad():
        out = enc(torch.randn(2, 3, 24, 12))  # a larger, non-square input
    assert out.shape == (2, 12, 6, VISION["hidden_size"])


def test_best_resolution_keeps_most_detail_then_wastes_least():
    vcfg = VisionConfig(**{**VISION, "image_size": 100, "max_tiles": 9})
    cands = candidate_resolutions(vcfg)
    assert len(cands) == 23  # as DeepSeek-VL2's list: every m x n grid with m * n <= 9
    assert select_best_resolution((300, 100), cands) == (300, 100)  # a 3:1 image fills 3x1 tiles exactly
    assert select_best_resolution((100, 310), cands) == (100, 400)  # tall: 1x4 keeps all of it
    assert select_best_resolution((120, 120), cands) == (200, 200)  # all of it fits, least padding
    assert select_best_resolution((60, 60), cands) == (100, 100)
    assert select_best_resolution((10_000, 10_000), cands) == (300, 300)  # the largest square grid
    # a tie in useful area goes to the candidate with less waste
    assert select_best_resolution((50, 50), [(200, 100), (100, 100)]) == (100, 100)


def test_vision_config_errors_name_the_field():
    base = nanoseek.get_preset("test")
    with pytest.raises(ConfigError, match="vision_config.patch_size"):
        base.replace(vision_config={**VISION, "patch_size": 32}, image_token_id=IMAGE_ID)
    with pytest.raises(ConfigError, match="vision_config.num_attention_heads"):
        base.replace(vision_config={**VISION, "num_attention_heads": 5}, image_token_id=IMAGE_ID)
    with pytest.raises(ConfigError, match="unknown key"):
        base.replace(vision_config={**VISION, "patch_szie": 2}, image_token_id=IMAGE_ID)
    with pytest.raises(ConfigError, match="image_token_id"):
        base.replace(vision_config=VISION)
    with pytest.raises(ConfigError, match="image_token_id"):
        base.replace(vision_config=VISION, image_token_id=base.vocab_size)
    with pytest.raises(ConfigError, match="image_std"):
        base.replace(vision_config={**VISION, "image_std": [0.5, 0.0, 0.5]}, image_token_id=IMAGE_ID)


def test_text_only_model_has_no_tower():
    model = nanoseek.build_model(nanoseek.get_preset("test"))
    assert model.vision is None
    assert not any(k.startswith("vision.") for k in model.state_dict())
    with pytest.raises(ValueError, match="no vision encoder"):
        model.embed_multimodal(torch.tensor([[1, 2]]), [])


def test_checkpoint_round_trip_keeps_the_tower(tmp_path):
    model = tiny_vlm()
    nanoseek.save(model, tmp_path / "vlm")
    config = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert config["vision_config"]["patch_size"] == 2 and config["image_token_id"] == IMAGE_ID
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vlm" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for key in ("vision.encoder.patch_embed.proj.weight", "vision.encoder.pos_embed",
                "vision.encoder.blocks.1.attn.qkv.weight", "vision.encoder.blocks.0.mlp.fc2.bias",
                "vision.encoder.norm.weight", "vision.projector.layers.0.weight", "vision.projector.layers.2.weight",
                "vision.image_newline", "vision.view_separator", "model.embed_tokens.weight"):
        assert key in keys, key
    loaded = nanoseek.load(tmp_path / "vlm")
    vcfg = loaded.vision.vcfg
    ims = images(vcfg, (0, 0), (1, 2))
    ids = torch.tensor([expand_image_tokens([1, IMAGE_ID, 2, IMAGE_ID], IMAGE_ID, ims, vcfg)])
    with torch.no_grad():
        a = model(inputs_embeds=model.embed_multimodal(ids, ims))
        b = loaded(inputs_embeds=loaded.embed_multimodal(ids, ims))
    assert torch.equal(a, b)


def test_overlapping_patches_see_their_neighbours_and_keep_the_grid():
    model = tiny_vlm(patch_overlap=1)
    patch_embed = model.vision.encoder.patch_embed
    assert patch_embed.proj.weight.shape[-2:] == (4, 4)  # patch 2 + 1 pixel on each side
    with torch.no_grad():
        assert model.vision.encoder(torch.randn(2, 3, 16, 16)).shape == (2, 8, 8, VISION["hidden_size"])
        x = torch.zeros(1, 3, 16, 16)
        base = patch_embed(x)
        x[0, :, 0, 2] = 1.0  # a pixel of patch (0, 1), on the border with patch (0, 0)
        changed = (patch_embed(x) - base).abs().sum(-1)[0] > 0
    assert changed[0, :3].tolist() == [True, True, False]
    assert image_token_count(VisionConfig(**{**VISION, "patch_overlap": 1})) == image_token_count(VisionConfig(**VISION))
    with pytest.raises(ConfigError, match="vision_config.patch_overlap"):
        VisionConfig(**{**VISION, "patch_overlap": -1})
