"""
Tests of clip_encoder.py and data/coco/cache_features.py against tiny random transformers CLIP models and
transformers' CLIPImageProcessor (PIL backend) as oracles.
"""

import importlib.util
import io
import json
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import transformers
from clip_encoder import (CLIPVision, CLIPVisionConfig, FeatureCache, ImageProcessorConfig, load_image,
                          preprocess)

ROOT = Path(__file__).resolve().parents[1]
transformers.logging.set_verbosity_error()


def hf_processor(**kwargs):
    """transformers' PIL-backend CLIP processor (the one LLaVA used); the class name moved in transformers 5."""
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kwargs)


def perturb(model, seed):
    """Random weights everywhere (HF initialises LayerNorms to 1/0, which would hide naming mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


HF_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 image_size=32, patch_size=8),
    "odd": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3,
                image_size=28, patch_size=7, hidden_act="gelu", layer_norm_eps=1e-6),
}


def save_hf_vision(folder, name="tiny", seed=0, **save_kwargs):
    torch.manual_seed(seed)
    model = perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**HF_CONFIGS[name])), seed)
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def tiny_tower(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_tower")
    return folder, save_hf_vision(folder)


# ---- the model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_features_match_transformers(tmp_path, name):
    hf = save_hf_vision(tmp_path, name)
    ours = CLIPVision.from_pretrained(tmp_path)
    c = HF_CONFIGS[name]
    x = torch.randn(2, 3, c["image_size"], c["image_size"])
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        n = c["num_hidden_layers"]
        for layer in (-1, -2, 0, n // 2, -n - 1):
            ref = out.hidden_states[layer]
            assert (ours.features(x, layer=layer, drop_cls=False) - ref).abs().max() <= 1e-4
            assert (ours.features(x, layer=layer) - ref[:, 1:]).abs().max() <= 1e-4
        last, pooled = ours(x)
    assert (last - out.last_hidden_state).abs().max() <= 1e-4
    assert (pooled - out.pooler_output).abs().max() <= 1e-4
    assert ours.features(x).shape == (2, (c["image_size"] // c["patch_size"]) ** 2, c["hidden_size"])


def test_features_run_only_the_layers_needed(tiny_tower):
    ours = CLIPVision.from_pretrained(tiny_tower[0])
    with torch.no_grad():
        for p in ours.vision_model.encoder.layers[-1].parameters():
            p.fill_(float("nan"))
        assert torch.isfinite(ours.features(torch.randn(1, 3, 32, 32), layer=-2)).all()


def test_loads_full_clipmodel_ignoring_text_tower(tmp_path):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=HF_CONFIGS["tiny"],
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1), projection_dim=16)
    clip = perturb(transformers.CLIPModel(config), 1)
    clip.save_pretrained(tmp_path)
    assert any(k.startswith("text_model.") for k in load_file(tmp_path / "model.safetensors"))
    ours = CLIPVision.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = clip.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (ours.features(x) - ref).abs().max() <= 1e-4


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    hf = save_hf_vision(tmp_path, "tiny", max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    ours = CLIPVision.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert (ours.features(x) - ref).abs().max() <= 1e-4
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        CLIPVision.from_pretrained(tmp_path)


def test_bf16_load_is_close_to_fp32(tiny_tower):
    fp32 = CLIPVision.from_pretrained(tiny_tower[0])
    bf16 = CLIPVision.from_pretrained(tiny_tower[0], dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in bf16.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a, b = fp32.features(x), bf16.features(x)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() / a.abs().max() < 3e-2
    assert bf16.identity() == fp32.identity()  # the fingerprint is of the stored tensors, not the load dtype
    with torch.no_grad():
        bf16.vision_model.encoder.layers[0].layer_norm1.weight.mul_(1.5)  # "fine-tuned"
    assert bf16.identity()["weights_hash"] != fp32.identity()["weights_hash"]


def test_bad_checkpoints_name_the_problem(tmp_path, tiny_tower, monkeypatch):
    with pytest.raises(FileNotFoundError, match="hf download"):
        CLIPVision.from_pretrained(tmp_path / "nowhere")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="hf download openai/clip-vit-large-patch14-336"):
        CLIPVision.from_pretrained("openai/clip-vit-large-patch14-336")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPVision.from_pretrained(tmp_path / "empty")

    def broken(edit):
        folder = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_tower[0], folder)
        state = load_file(folder / "model.safetensors")
        edit(state)
        save_file(state, folder / "model.safetensors")
        return folder

    name = "encoder.layers.1.mlp.fc1.weight"
    folder = broken(lambda s: s.__setitem__(name, torch.zeros(5, 5)))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*shape"):
        CLIPVision.from_pretrained(folder)
    folder = broken(lambda s: s.pop(name))
    with pytest.raises(ValueError, match="missing.*mlp.fc1.weight"):
        CLIPVision.from_pretrained(folder)
    folder = broken(lambda s: s.__setitem__("encoder.layers.9.mlp.fc1.weight", torch.zeros(1)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layers\.9"):
        CLIPVision.from_pretrained(folder)
    ours = CLIPVision.from_pretrained(tiny_tower[0])
    with pytest.raises(ValueError, match="pixel_values"):
        ours.features(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="layer 4"):
        ours.features(torch.randn(1, 3, 32, 32), layer=4)


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    processor = ImageProcessorConfig(crop_size=32, shortest_edge=40, image_mean=(0.5, 0.4, 0.3),
                                     image_std=(0.2, 0.3, 0.4))
    ours = CLIPVision(CLIPVisionConfig.from_preset("tiny"), processor).eval()
    ours.init_weights(seed=1)
    ours.save_pretrained(tmp_path)
    assert all(k.startswith("vision_model.") for k in load_file(tmp_path / "model.safetensors"))
    hf = transformers.CLIPVisionModel.from_pretrained(tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours.features(x, layer=-1) - hf(pixel_values=x).last_hidden_state[:, 1:]).abs().max() <= 1e-4
    back = CLIPVision.from_pretrained(tmp_path)
    assert back.identity()["weights_hash"] == ours.identity()["weights_hash"]
    assert back.processor == processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    hf_pixels = hf_processor(**json.loads((tmp_path / "preprocessor_config.json").read_text()))(
        images=[image], return_tensors="pt").pixel_values
    assert (back.preprocess([image]) - hf_pixels).abs().max() <= 1e-6


def test_presets():
    large = CLIPVisionConfig.from_preset("clip-vit-large-patch14-336")
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    assert large.num_patches == 576
    assert CLIPVisionConfig.from_preset("demo").num_patches == 64
    with pytest.raises(ValueError, match="unknown CLIP preset"):
        CLIPVisionConfig.from_preset("vit-huge")
    # a sparse CLIPModel config (as old transformers wrote it) reads missing fields as HF's defaults
    sparse = {"vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14, "dropout": 0.0}}
    assert CLIPVisionConfig.from_hf_json(sparse) == large


# ---- preprocessing ------------------------------------------------------------------------------------


def photos():
    from skimage import data
    from sklearn.datasets import load_sample_images
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())] + \
        [Image.fromarray(a) for a in load_sample_images().images]


def odd_images():
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    palette = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).convert("P")
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = 3
    return {
        "rgba": rgba, "grayscale": Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), "L"),
        "gray_alpha": rgba.convert("LA"), "palette": palette, "palette_alpha": palette_alpha,
        "cmyk": rgba.convert("RGB").convert("CMYK"),
        "tall_strip": Image.fromarray(rng.integers(0, 256, (4000, 1, 3), dtype=np.uint8)),
        "wide_strip": Image.fromarray(rng.integers(0, 256, (1, 4000, 3), dtype=np.uint8)),
        "tiny_5x5": Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)),
    }


def test_preprocess_matches_clip_image_processor_on_photos():
    hf = hf_processor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    ours = ImageProcessorConfig(crop_size=336, shortest_edge=336)
    images = photos()
    ref = hf(images=images, return_tensors="pt").pixel_values
    got = preprocess(images, ours)
    assert got.shape == ref.shape == (len(images), 3, 336, 336) and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", list(odd_images()))
def test_preprocess_matches_clip_image_processor_on_odd_images(kind):
    image = odd_images()[kind]
    for size in (32, 48):  # small crops keep the 1x4000 strips cheap for the HF oracle (it resizes them whole)
        hf = hf_processor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        ref = hf(images=[image], return_tensors="pt").pixel_values
        assert (preprocess([image], ImageProcessorConfig(crop_size=size, shortest_edge=size)) - ref).abs().max() <= 1e-5


def test_preprocess_extreme_strip_does_not_blow_up():
    strip = Image.new("RGB", (1, 200_000), (10, 200, 30))  # a full resize to 336 wide would be 67 GB
    pixels = preprocess([strip], ImageProcessorConfig(crop_size=336, shortest_edge=336))
    mean, std = torch.tensor(ImageProcessorConfig.image_mean), torch.tensor(ImageProcessorConfig.image_std)
    expected = (torch.tensor([10, 200, 30]) / 255 - mean) / std
    assert pixels.shape == (1, 3, 336, 336)
    assert torch.allclose(pixels[0].mean(dim=(1, 2)), expected, atol=1e-5)


def test_preprocess_reads_both_preprocessor_config_formats():
    old = {"crop_size": 336, "size": 336, "do_center_crop": True, "resample": 3,
           "image_mean": [0.1, 0.2, 0.3], "image_std": [0.3, 0.2, 0.1],
           "feature_extractor_type": "CLIPFeatureExtractor"}
    new = {"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}}
    a, b = ImageProcessorConfig.from_hf_json(old), ImageProcessorConfig.from_hf_json(new)
    assert (a.crop_size, a.shortest_edge, a.image_mean) == (336, 336, (0.1, 0.2, 0.3))
    assert (b.crop_size, b.image_std) == (336, ImageProcessorConfig.image_std)
    with pytest.raises(ValueError, match="do_center_crop"):
        ImageProcessorConfig.from_hf_json({**old, "do_center_crop": False})


def test_pad_to_square_matches_llava():
    mean = ImageProcessorConfig.image_mean

    def llava_expand2square(image, background):  # LLaVA's definition, written out here from its description
        width, height = image.size
        if width == height:
            return image
        if width > height:
            result = Image.new(image.mode, (width, width), background)
            result.paste(image, (0, (width - height) // 2))
        else:
            result = Image.new(image.mode, (height, height), background)
            result.paste(image, ((height - width) // 2, 0))
        return result

    hf = hf_processor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    images = [photos()[1], photos()[2].rotate(90, expand=True), odd_images()["rgba"].convert("RGB")]
    expected = hf(images=[llava_expand2square(im, tuple(int(x * 255) for x in mean)) for im in images],
                  return_tensors="pt").pixel_values
    got = preprocess(images, ImageProcessorConfig(crop_size=64, shortest_edge=64), pad_to_square=True)
    assert (got - expected).abs().max() <= 1e-5
    border = got[0, :, 0, 0]  # coffee is wider than tall: the top rows are the mean colour
    assert torch.allclose(border, (torch.tensor([122, 116, 104]) / 255 - torch.tensor(mean)) / torch.tensor(
        ImageProcessorConfig.image_std), atol=1e-5)


# ---- load_image ----------------------------------------------------------------------------------------


def encode(image, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_header(width, height):
    """A PNG that declares a size but carries no pixels: enough for a decompression-bomb check."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_load_image_modes(tmp_path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[:, :3] = (255, 0, 0, 255)  # left half opaque red, right half fully transparent
    image = load_image(encode(Image.fromarray(rgba, "RGBA")))
    assert image.mode == "RGB" and image.size == (6, 4)
    assert np.array(image)[0, 0].tolist() == [255, 0, 0] and np.array(image)[0, 5].tolist() == [255, 255, 255]

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    a, b = [10, 20, 30], [200, 100, 50]
    assert np.array(load_image(encode(palette))).tolist() == [[a, b], [b, a]]
    assert np.array(load_image(encode(palette, transparency=1)))[0, 1].tolist() == [255, 255, 255]

    gray = load_image(encode(Image.fromarray(np.full((3, 3), 77, dtype=np.uint8), "L"), "JPEG"))
    assert gray.mode == "RGB" and np.abs(np.array(gray).astype(int) - 77).max() <= 1

    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.new("RGB", (2, 2))))
    assert load_image(path).size == load_image(str(path)).size == (2, 2)


def test_load_image_applies_exif_orientation():
    pixels = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored image must be rotated 90 degrees clockwise to be upright
    image = load_image(encode(Image.fromarray(pixels), exif=exif))
    assert image.size == (20, 40)
    assert np.array_equal(np.array(image), np.rot90(pixels, k=-1))


def test_load_image_refuses_bombs_and_non_images():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may slip through as a mere warning
        for w, h in [(8000, 8000), (10_000, 10_000), (20_000, 20_000)]:  # ours, PIL's warning, PIL's error
            with pytest.raises(ValueError, match="decompression bomb"):
                load_image(png_header(w, h))
        with pytest.raises(ValueError, match="not an image"):
            load_image(b"GIF89a? no, just text")
        with pytest.raises(ValueError, match="could not decode"):
            load_image(png_header(10, 10))
    with pytest.raises(FileNotFoundError):
        load_image("/no/such/image.png")


def test_load_image_refuses_a_folder_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path}: Is a directory"):
        load_image(tmp_path)


# ---- the feature cache -----------------------------------------------------------------------------------


def cache_module():
    spec = importlib.util.spec_from_file_location("cache_features", ROOT / "data/coco/cache_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    for i in range(9):
        h, w = rng.integers(20, 90, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"{i:03d}.png")
    (root / "train" / "broken.jpg").write_bytes(b"not really a jpeg")
    (root / "notes.txt").write_text("ignored")
    return root


def build_cache(cf, images, vision, out, rank=0, world_size=1, **overrides):
    config = cf.parse_args([f"--images={images}", f"--vision={vision}", f"--out={out}", "--workers=0",
                            "--batch_size=3", "--shard_size=4", "--device=cpu"] +
                           [f"--{k}={v}" for k, v in overrides.items()])
    stats = cf.cache_features(config, rank=rank, world_size=world_size, log=lambda *a: None)
    return stats, config


def live_features(vision, path, **kwargs):
    layer, pad = kwargs.get("layer", -2), kwargs.get("pad_to_square", False)
    with torch.no_grad():
        return vision.features(vision.preprocess([load_image(path)], pad_to_square=pad), layer=layer)[0]


def test_feature_cache_matches_live_features_and_refuses_stale_use(tmp_path, image_folder, tiny_tower):
    cf = cache_module()
    tower = tiny_tower[0]
    out = tmp_path / "cache"
    stats, _ = build_cache(cf, image_folder, tower, out, workers=2)
    assert (stats["cached"], stats["failed"]) == (9, 1)
    index = cf.write_index(out, stats["meta"])
    assert list(index["failed"]) == ["train/broken.jpg"]
    vision = CLIPVision.from_pretrained(tower)
    cache = FeatureCache(out, vision=vision)
    assert len(cache) == 9 and "train/004.png" in cache and "train/broken.jpg" not in cache
    for rel in cache.keys():
        cached = cache.get(rel)
        assert cached.dtype == torch.float16 and cached.shape == (16, 64)
        assert torch.allclose(cached.float(), live_features(vision, image_folder / rel), atol=5e-3, rtol=2e-3)
    FeatureCache(out, vision=str(tower))  # a folder path identifies the tower too

    with pytest.raises(ValueError, match="layer"):
        FeatureCache(out, vision=vision, layer=-1)
    with pytest.raises(ValueError, match="pad_to_square"):
        FeatureCache(out, vision=vision, pad_to_square=True)
    other = tmp_path / "other_tower"
    save_hf_vision(other, seed=1)
    with pytest.raises(ValueError, match="weights_hash"):
        FeatureCache(out, vision=other)
    with pytest.raises(ValueError, match="another tower or setting"):
        build_cache(cf, image_folder, tower, out, layer=-1)
    with pytest.raises(FileNotFoundError, match="cache_features.py"):
        FeatureCache(tmp_path / "no_cache", vision=vision)


def test_feature_cache_resumes_after_a_crash(tmp_path, image_folder, tiny_tower):
    cf = cache_module()
    out = tmp_path / "cache"
    stats, _ = build_cache(cf, image_folder, tiny_tower[0], out, layer=1, pad_to_square=True)
    shards = cf.shard_files(out)
    assert len(shards) == 3  # 9 images, 4 per shard
    lost = set(load_file(shards[1]))
    shards[1].unlink()
    (out / "features-rank000-00007.safetensors.tmp").write_bytes(b"half a shard")  # died while writing
    again, _ = build_cache(cf, image_folder, tiny_tower[0], out, layer=1, pad_to_square=True)
    assert (again["cached"], again["skipped"]) == (len(lost), 9 - len(lost))
    assert not list(out.glob("*.tmp"))
    cf.write_index(out, again["meta"])
    vision = CLIPVision.from_pretrained(tiny_tower[0])
    cache = FeatureCache(out, vision=vision, layer=1, pad_to_square=True)
    for rel in lost:
        live = live_features(vision, image_folder / rel, layer=1, pad_to_square=True)
        assert torch.allclose(cache.get(rel).float(), live, atol=5e-3, rtol=2e-3)


def test_feature_cache_shards_across_ranks(tmp_path, image_folder, tiny_tower):
    cf = cache_module()
    out = tmp_path / "cache"
    counts = [build_cache(cf, image_folder, tiny_tower[0], out, rank=r, world_size=2)[0]["cached"] for r in (0, 1)]
    assert counts == [5, 4]  # 10 files, the broken one falls to rank 1
    index = cf.write_index(out, cf.cache_meta(CLIPVision.from_pretrained(tiny_tower[0])))
    assert len(index["files"]) == 9 and set(index["failed"]) == {"train/broken.jpg"}
    ranks = {index["files"][f"train/{i:03d}.png"].split("-")[1] for i in range(0, 9, 2)}
    assert ranks == {"rank000"}


def test_cache_command_line(tmp_path, image_folder, tiny_tower, capsys):
    cf = cache_module()
    config = cf.parse_args(["--images=a", "--vision=b", "--out=c", "--pad_to_square", "--layer=-1", "--drop_cls=false"])
    assert (config.pad_to_square, config.layer, config.drop_cls, config.batch_size) == (True, -1, False, 32)
    with pytest.raises(SystemExit, match="unknown option"):
        cf.parse_args(["--images=a", "--vision=b", "--out=c", "--lr=3"])
    with pytest.raises(SystemExit, match="integer"):
        cf.parse_args(["--images=a", "--vision=b", "--out=c", "--layer=last"])
    cf.main([f"--images={image_folder}", f"--vision={tiny_tower[0]}", f"--out={tmp_path / 'c'}", "--workers=0"])
    assert "9 images cached, 1 failed" in capsys.readouterr().out
    assert len(FeatureCache(tmp_path / "c", vision=tiny_tower[0])) == 9
