"""
The CLIP ViT vision tower of omniphi, written out in plain PyTorch.

- CLIPVision: HF `CLIPVisionModel` numerics with the same module names (`vision_model.embeddings...`), so its
  state_dict keys are the HF safetensors keys. `features(pixel_values, layer=-2)` is HF's
  `hidden_states[layer][:, 1:]` and runs only the layers it needs.
- from_pretrained / save_pretrained: HF safetensors of a full CLIPModel (text tower ignored) or a CLIPVisionModel,
  single file or index + shards, loaded tensor by tensor onto a meta-built model.
- preprocess: the same pixels as transformers' CLIPImageProcessor (PIL bicubic resize of the shortest side,
  center crop, rescale, normalize), plus LLaVA's pad-to-square; load_image opens untrusted image files safely.
- FeatureCache: reads the fp16 feature shards written by data/coco/cache_features.py and refuses a cache that
  was made with another tower, layer or preprocessing.
"""

import hashlib
import io
import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from model import atomic_write, checkpoint_files, resolve_checkpoint, resolve_dtype, save_safetensors

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 50_000_000  # load_image refuses bigger images (decompression bombs)
MAX_RESIZED_PIXELS = 64_000_000  # beyond this a resize-then-crop only resamples the crop (extreme aspect ratios)


@dataclass
class CLIPVisionConfig:
    # defaults are transformers' CLIPVisionConfig defaults (ViT-B/32), so sparse HF config files read the same
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act '{self.hidden_act}'; use one of {', '.join(ACTIVATIONS)}")

    @property
    def grid_size(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid_size ** 2

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in CLIP_PRESETS:
            raise ValueError(f"unknown CLIP preset '{name}'; choose from {', '.join(CLIP_PRESETS)}")
        return cls(**{**CLIP_PRESETS[name], **overrides})

    @classmethod
    def from_hf_json(cls, d):
        """A CLIPVisionModel config.json, or a CLIPModel one (its vision_config is used)."""
        d = d.get("vision_config", d)
        if d is None:
            raise ValueError("config has an empty vision_config")
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_hf_json(self):
        return {"architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", **asdict(self),
                "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "projection_dim": 512}


CLIP_PRESETS = {
    "clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14),  # LLaVA-1.5
    "clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, image_size=224, patch_size=14),
    "clip-vit-base-patch16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=224, patch_size=16),
    # the CPU demo: easy-vqa's 64x64 images at 32x32, an 8x8 grid of 64 patches, trains in minutes on a laptop
    "demo": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 image_size=32, patch_size=4),
    # unit tests
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8),
}


@dataclass
class ImageProcessorConfig:
    """The part of an HF preprocessor_config.json that CLIP uses: resize the shortest side, center crop, normalize."""
    crop_size: int = 224
    shortest_edge: int = 224
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = Image.Resampling.BICUBIC

    def __post_init__(self):
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean and image_std need 3 values, got {self.image_mean} and {self.image_std}")
        if self.shortest_edge < self.crop_size:
            raise ValueError(f"shortest_edge {self.shortest_edge} is smaller than crop_size {self.crop_size}")

    @classmethod
    def from_hf_json(cls, d):
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag) is False:
                raise ValueError(f"preprocessor_config.json sets {flag}=false, "
                                 "which CLIP preprocessing does not support")
        crop, size = d.get("crop_size", 224), d.get("size", 224)
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"crop_size must be square, got {crop}")
            crop = crop["height"]
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"size must give shortest_edge for CLIP preprocessing, got {size}")
            size = size["shortest_edge"]
        return cls(crop_size=int(crop), shortest_edge=int(size), image_mean=d.get("image_mean", CLIP_MEAN),
                   image_std=d.get("image_std", CLIP_STD), rescale_factor=d.get("rescale_factor", 1 / 255),
                   resample=int(d.get("resample", Image.Resampling.BICUBIC)))

    def to_hf_json(self):
        return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True,
                "do_resize": True, "size": {"shortest_edge": self.shortest_edge}, "resample": int(self.resample),
                "do_center_crop": True, "crop_size": {"height": self.crop_size, "width": self.crop_size},
                "do_rescale": True, "rescale_factor": self.rescale_factor,
                "do_normalize": True, "image_mean": list(self.image_mean), "image_std": list(self.image_std)}


# ---- the model ----------------------------------------------------------------------------------------


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class VisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values):
        if pixel_values.ndim != 4 or pixel_values.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be (B, 3, {self.image_size}, {self.image_size}), "
                             f"got {tuple(pixel_values.shape)}")
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_attention_heads
        d = config.hidden_size
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.n_head, D // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])


class VisionTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embeddings = VisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: HF's name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPVision(nn.Module):
    """The vision tower. `processor` holds the preprocessing that belongs to these weights."""

    def __init__(self, config, processor=None):
        super().__init__()
        self.config = config
        self.processor = processor or ImageProcessorConfig(crop_size=config.image_size, shortest_edge=config.image_size)
        self.vision_model = VisionTransformer(config)
        self.source = None  # where the weights came from (a folder or hub id), for cache metadata
        self._file_hash = self._loaded_hash = None  # fingerprints of the checkpoint, and of it as loaded
        self.init_weights()

    def init_weights(self, seed=None):
        """Random CLIP-style initialisation (for demo towers trained from scratch)."""
        if any(p.is_meta for p in self.parameters()):
            return
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        d, L = self.config.hidden_size, self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if "norm" in name and name.endswith("weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = d ** -0.5 if "class_embedding" in name else 0.02
                if "out_proj" in name or "fc2" in name:
                    std = 0.02 / (2 * L) ** 0.5
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    @property
    def dtype(self):
        return self.vision_model.embeddings.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.vision_model.embeddings.patch_embedding.weight.device

    def forward(self, pixel_values):
        """(last_hidden_state (B, 1 + N, D), pooled (B, D)) exactly as HF CLIPVisionModel."""
        x = self.features(pixel_values, layer=-1, drop_cls=False)
        return x, self.vision_model.post_layernorm(x[:, 0])

    def features(self, pixel_values, layer=-2, drop_cls=True):
        """HF's hidden_states[layer] (index 0 = embeddings after pre_layrnorm), without the class token by default."""
        n_layers = self.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer {layer} is out of range for a tower with {n_layers} layers "
                             f"(use -{n_layers + 1} .. {n_layers})")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        for block in vm.encoder.layers[:layer % (n_layers + 1)]:
            x = block(x)
        return x[:, 1:] if drop_cls else x

    def preprocess(self, images, pad_to_square=False):
        return preprocess(images, self.processor, pad_to_square=pad_to_square)

    # ---- checkpoints -----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, dtype=None, device="cpu"):
        """HF safetensors of a CLIPModel (only vision_model.* is kept) or a CLIPVisionModel, one tensor at a time."""
        from safetensors import safe_open

        dtype = resolve_dtype(dtype)
        folder = resolve_checkpoint(path_or_hub_id, "openai/clip-vit-large-patch14-336")
        config = CLIPVisionConfig.from_hf_json(json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config, read_processor_config(folder, config))
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        missing = set(shapes)
        hasher = WeightsHasher()
        for file in checkpoint_files(folder):
            with safe_open(file, framework="pt", device="cpu") as f:
                for stored_name in f.keys():
                    name = hf_to_ours(stored_name)
                    if name is None:
                        continue
                    if name not in shapes:
                        raise ValueError(f"unexpected tensor '{stored_name}' in {file.name}: "
                                         "not part of a CLIP vision tower")
                    if name not in missing:
                        raise ValueError(f"tensor '{stored_name}' appears twice in the checkpoint {folder}")
                    tensor = f.get_tensor(stored_name)
                    if tensor.shape != shapes[name]:
                        raise ValueError(f"tensor '{stored_name}' in {file.name} has shape {tuple(tensor.shape)}, "
                                         f"expected {tuple(shapes[name])} for the config in {folder / 'config.json'}")
                    missing.discard(name)
                    hasher.add(name, tensor)
                    module_name, attr = name.rsplit(".", 1)
                    module = model.get_submodule(module_name)
                    module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=dtype))
        if missing:
            raise ValueError(f"checkpoint {folder} is missing {len(missing)} vision tensors, e.g. "
                             f"'{sorted(missing)[0]}'")
        model.source = str(path_or_hub_id)
        model._file_hash, model._loaded_hash = hasher.hexdigest(), model.weights_hash()
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_size=None):
        """config.json + model.safetensors (or shards + index) + preprocessor_config.json: what
        transformers.CLIPVisionModel and CLIPImageProcessor load."""
        # our names are the classic HF names (vision_model.*), which every transformers version loads
        out = save_safetensors(self.state_dict(), out_dir, max_shard_size)
        config = {**self.config.to_hf_json(), "torch_dtype": str(self.dtype).removeprefix("torch.")}
        atomic_write(out / "config.json", json.dumps(config, indent=2))
        atomic_write(out / "preprocessor_config.json", json.dumps(self.processor.to_hf_json(), indent=2))

    def weights_hash(self):
        hasher = WeightsHasher()
        for name, p in self.state_dict().items():
            hasher.add(name, p)
        return hasher.hexdigest()

    def identity(self):
        """What a feature cache records about the tower: where it came from and hashes of its config and weights.
        A tower unchanged since from_pretrained reports its checkpoint's hash, whatever dtype it was loaded in."""
        weights_hash = self.weights_hash()
        if weights_hash == self._loaded_hash:
            weights_hash = self._file_hash
        return {"source": self.source, "config_hash": config_hash(self.config), "weights_hash": weights_hash}


# ---- checkpoint helpers ----------------------------------------------------------------------------------

TOWER_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
SKIPPED = re.compile(r"(text_model\.|text_projection\.|visual_projection\.|logit_scale$|.*position_ids$)")


def hf_to_ours(name):
    """Our state_dict name for an HF tensor name, or None for tensors a vision tower does not use.
    CLIPModel files and transformers<5 CLIPVisionModel files say 'vision_model.x'; transformers 5 saves 'x'."""
    if SKIPPED.match(name):
        return None
    if name.startswith(TOWER_PREFIXES):
        return "vision_model." + name
    return name


class WeightsHasher:
    """Fingerprint of a tower from its class embedding and every LayerNorm (small tensors that any training moves)."""
    PATTERN = re.compile(r".*(class_embedding|layrnorm\.|layernorm\.|layer_norm\d\.)")

    def __init__(self):
        self.parts = {}

    def add(self, name, tensor):
        if self.PATTERN.match(name):
            self.parts[name] = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()

    def hexdigest(self):
        h = hashlib.sha256()
        for name in sorted(self.parts):
            h.update(name.encode() + b"\0" + self.parts[name])
        return h.hexdigest()[:16]


def config_hash(config):
    return hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode()).hexdigest()[:16]


def read_processor_config(folder, config):
    file = Path(folder) / "preprocessor_config.json"
    if file.is_file():
        return ImageProcessorConfig.from_hf_json(json.loads(file.read_text()))
    return ImageProcessorConfig(crop_size=config.image_size, shortest_edge=config.image_size)


def tower_identity(path):
    """(identity, config, processor) of a checkpoint folder, read from its files without building the model."""
    from safetensors import safe_open

    folder = resolve_checkpoint(path, "openai/clip-vit-large-patch14-336")
    config = CLIPVisionConfig.from_hf_json(json.loads((folder / "config.json").read_text()))
    hasher = WeightsHasher()
    for file in checkpoint_files(folder):
        with safe_open(file, framework="pt", device="cpu") as f:
            for stored_name in f.keys():
                name = hf_to_ours(stored_name)
                if name is not None and WeightsHasher.PATTERN.match(name):
                    hasher.add(name, f.get_tensor(stored_name))
    return {"source": str(path), "config_hash": config_hash(config), "weights_hash": hasher.hexdigest()}, \
        config, read_processor_config(folder, config)


# ---- images --------------------------------------------------------------------------------------------


def load_image(source):
    """Open an image file (path, bytes or binary file object) as an RGB PIL image, upright per its EXIF
    orientation; transparency is composited onto white (as CLIPImageProcessor does). Refuses non-images and
    images over MAX_IMAGE_PIXELS and paths that cannot be read (a folder, no permission) with a ValueError; a missing
    file raises FileNotFoundError."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<bytes>"
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(source)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ValueError(f"refusing {name}: too many pixels, a possible decompression bomb ({err})") from None
        except UnidentifiedImageError:
            raise ValueError(f"not an image (or a format PIL cannot read): {name}") from None
        except FileNotFoundError:
            raise
        except OSError as err:  # a folder, no permission
            raise ValueError(f"cannot read image {name}: {err.strerror or err}") from None
    with image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"refusing {name}: {image.width}x{image.height} is over {MAX_IMAGE_PIXELS:,} pixels "
                             "(a possible decompression bomb)")
        try:
            image.load()
            image = ImageOps.exif_transpose(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"could not decode image {name}: {err}") from None
        return to_rgb(image)


def to_rgb(image):
    """RGB, with any transparency composited onto white: the rule of transformers' convert_to_rgb."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def expand_to_square(image, fill):
    """LLaVA's pad_to_square: the image centred on a square canvas of its longer side, filled with `fill`."""
    w, h = image.size
    if w == h:
        return image
    canvas = Image.new(image.mode, (max(w, h),) * 2, fill)
    canvas.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def resize_and_crop(image, shortest_edge, crop_size, resample=Image.Resampling.BICUBIC):
    """Resize so the shorter side is shortest_edge (longer side truncated to int, like HF), then center crop."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_long = int(shortest_edge * long / short)
    new_w, new_h = (shortest_edge, new_long) if w <= h else (new_long, shortest_edge)
    top, left = (new_h - crop_size) // 2, (new_w - crop_size) // 2
    if new_w * new_h <= MAX_RESIZED_PIXELS:
        return image.resize((new_w, new_h), resample=resample).crop((left, top, left + crop_size, top + crop_size))
    # an extreme strip (e.g. 1x100000): resample only the crop's source box; equal up to resampling rounding
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy)
    return image.resize((crop_size, crop_size), resample=resample, box=box)


def preprocess(images, processor, pad_to_square=False):
    """PIL images -> (B, 3, S, S) float32 pixel values, equal to transformers' CLIPImageProcessor (PIL backend)."""
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("preprocess needs at least one image")
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
    fill = tuple(int(m * 255) for m in processor.image_mean)
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image {i} is a {type(image).__name__}, expected a PIL image (see load_image)")
        image = to_rgb(image)
        if pad_to_square:
            image = expand_to_square(image, fill)
        image = resize_and_crop(image, processor.shortest_edge, processor.crop_size, processor.resample)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        # float64 rescale then float32 normalize: HF's arithmetic, so the values agree bit for bit
        out.append(((pixels.double() * processor.rescale_factor).float() - mean) / std)
    return torch.stack(out)


# ---- the feature cache ---------------------------------------------------------------------------------


def cache_meta(vision, layer=-2, drop_cls=True, pad_to_square=False):
    """Everything a cached feature depends on. vision: a CLIPVision or a checkpoint folder."""
    if isinstance(vision, CLIPVision):
        identity, config, processor = vision.identity(), vision.config, vision.processor
    else:
        identity, config, processor = tower_identity(vision)
    n = config.num_hidden_layers
    if not -(n + 1) <= layer <= n:
        raise ValueError(f"layer {layer} is out of range for a tower with {n} layers")
    return {"vision": identity["source"], "config_hash": identity["config_hash"],
            "weights_hash": identity["weights_hash"], "layer": layer % (n + 1), "drop_cls": bool(drop_cls),
            "pad_to_square": bool(pad_to_square), "image_size": processor.crop_size,
            "shortest_edge": processor.shortest_edge, "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std), "num_tokens": config.num_patches + (not drop_cls),
            "hidden_size": config.hidden_size}


def meta_mismatches(cached, wanted):
    """Keys whose values differ (the tower's source path is informational: the hashes identify it)."""
    return [k for k in sorted(set(cached) | set(wanted)) if k != "vision" and cached.get(k) != wanted.get(k)]


class FeatureCache:
    """Read-only view of a feature cache folder (index.json + fp16 safetensors shards) for one tower setting."""

    def __init__(self, folder, *, vision, layer=-2, drop_cls=True, pad_to_square=False):
        self.folder = Path(folder)
        index_file = self.folder / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: build the cache with data/coco/cache_features.py "
                                    "(an interrupted run resumes when started again)")
        index = json.loads(index_file.read_text())
        wanted = cache_meta(vision, layer, drop_cls, pad_to_square)
        bad = meta_mismatches(index["meta"], wanted)
        if bad:
            detail = "; ".join(f"{k}: cached {index['meta'].get(k)!r}, wanted {wanted.get(k)!r}" for k in bad)
            raise ValueError(f"feature cache {self.folder} was built for another tower or setting ({detail}); "
                             "rebuild it or point at the matching cache")
        self.meta, self.files = index["meta"], index["files"]
        self._open = {}

    def __getstate__(self):  # for DataLoader workers: open shard handles are not picklable
        return {**self.__dict__, "_open": {}}

    def __len__(self):
        return len(self.files)

    def __contains__(self, relpath):
        return relpath in self.files

    def keys(self):
        return self.files.keys()

    def get(self, relpath):
        """The cached (num_tokens, hidden_size) fp16 features of one image (path relative to the image folder)."""
        from safetensors import safe_open

        if relpath not in self.files:
            raise KeyError(f"'{relpath}' is not in the feature cache {self.folder}")
        shard = self.files[relpath]
        if shard not in self._open:
            file = self.folder / shard
            if not file.is_file():
                raise FileNotFoundError(f"feature shard {file} listed in index.json is missing")
            self._open[shard] = safe_open(file, framework="pt", device="cpu")
        return self._open[shard].get_tensor(relpath)
