"""
Multimodal training, LLaVA style. Stage `align`: the vision tower and the language model are frozen and only the
projector learns, on captions. Stage `instruct`: the projector and LoRA adapters on a 16-bit or NF4 base learn to
answer, on multi-turn conversations. The loss covers only the assistant's answers and the <|endoftext|> after each.
Stage `clip`, for a tower from random weights only: the tower learns from image-caption pairs with CLIP's contrastive
objective before align (`--stage=all` runs clip, align, instruct; `--stage=both` align and instruct).

    python train_mm.py                                    # offline demo on a CPU: easy-vqa, clip, align, instruct, eval
    python train_mm.py --eval                             # evaluate the demo checkpoint again

    torchrun --nproc_per_node=8 train_mm.py --preset=llava --stage=align \
        --data=data/llava/blip_laion_cc_sbu_558k.json --image_folder=data/llava/pretrain_images --features=...
    torchrun --nproc_per_node=8 train_mm.py --preset=llava --stage=instruct --init=out/mm-llava/align/ckpt \
        --data=data/llava/llava_instruct_150k.json --image_folder=data/coco/train2017 --quantize=nf4

Options are --key=value overrides of MMConfig on top of a preset. The data is LLaVA JSON (see data/llava/README.md);
it is checked with data/llava/prepare.py before the first step. Iteration i's batch is a function of (seed, i), so a
run resumes exactly (--resume) and N processes train like one. The run folder gets log.jsonl (with held-out loss
and sample answers), loss.png and ckpt/, a multimodal checkpoint that generate.py and serve.py load:
mm_config.json, projector.safetensors, the PEFT adapter (instruct), vision/ when the tower is ours, train_state.pt.

The demo has no pretrained CLIP offline: its tower is a small ViT from random weights that learns from easy-vqa's
captions in the clip stage and is frozen after it, as LLaVA's is. Trained through the LM instead (--train_vision),
such a tower learns colours but never shapes. Its LM is a random 'demo' Phi (`--lm=out/lm-demo/ckpt`, the
pretraining demo's model, works too), which cannot say the captions' words: a frozen output head caps every logit
through the final LayerNorm, and a model pretrained on Python sources shares one output direction among the words it
never saw. So the demo adapts lm_head with LoRA too, and trains LoRA already in align (--align_lora), where LLaVA
trains the projector alone.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

# On a CPU shared with other jobs, idle OpenMP threads should sleep rather than spin: spinning threads of two
# processes starve each other (8x slower here). Set before torch loads its OpenMP runtime; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clip_encoder import CLIP_PRESETS, CLIPVision, CLIPVisionConfig, FeatureCache, load_image, preprocess
from lora import apply_lora, load_adapter, lora_parameters, make_optimizer, save_adapter
from model import PRESETS as MODEL_PRESETS
from model import Phi, PhiConfig
from projector import build_projector, load_projector, num_image_tokens, save_projector, splice_image_features
from tokenizer import IMAGE_TOKEN_ID, Tokenizer, encode_chat
from train_lm import (JsonlLog, atomic_write, autocast_dtype, cosine_lr, find_checkpoint, format_seconds,
                      gather_objects, gradient_sync, parse_config, parse_options, plot_losses, rng_state,
                      save_checkpoint, seed_everything, set_rng_state, setup_distributed)

REPO = Path(__file__).resolve().parent
IGNORE = -100
ROLES = {"human": "user", "gpt": "assistant"}
TEMPLATE = "omniphi-chat"
KILL_AT_ITER_ENV = "TRAIN_MM_SIGKILL_AT_ITER"  # for the resume test: SIGKILL this process after that iteration
EASYVQA = REPO / "data" / "easyvqa" / "prepared"
STAGES = {"clip": ("clip",), "align": ("align",), "instruct": ("instruct",), "both": ("align", "instruct"),
          "all": ("clip", "align", "instruct")}


@dataclass
class MMConfig:
    preset: str = "demo"  # a PRESETS entry that sets the defaults (per stage); options on the command line win
    stage: str = "both"  # clip | align | instruct | both (align, then instruct) | all (clip, align, instruct)
    data: str = ""  # LLaVA JSON to train on
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    val_data: str = ""  # held-out LLaVA JSON; empty: whole images with about val_size records are split off --data
    val_size: int = 256
    eval_data: str = ""  # single-turn questions (LLaVA JSON) for --eval and the evaluation after training
    skip_bad: bool = False  # leave out bad records (listed) instead of stopping
    check_images: str = "open"  # how the data check looks at images: open | decode | exists | none
    lm: str = ""  # base LM folder or hub id, or a model.py preset name: random weights (with --init: its LM)
    vision: str = ""  # CLIP folder or hub id, or a clip_encoder preset name: a random tower (train it: --train_vision)
    vision_config: str = ""  # overrides of a random tower's preset, e.g. "hidden_size=128,intermediate_size=512"
    init: str = ""  # a multimodal checkpoint to continue from (instruct starts from the align checkpoint)
    out_dir: str = ""  # empty: out/mm-{preset}/{stage} (--stage=both: out/mm-{preset} with align/ and instruct/)
    features: str = ""  # a CLIP feature cache (data/coco/cache_features.py) made for the same tower and layer
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu | pool2x2_mlp2x_gelu
    feature_layer: int = -2
    pad_to_square: bool = False
    train_vision: bool = False  # also train the tower, through the LM (a random one learns colours so, not shapes)
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "q_proj,k_proj,v_proj,dense,fc1,fc2"  # add lm_head for an LM that never saw the answers' words
    align_lora: bool = False  # LoRA trains in the align stage too (an LM that cannot yet say the captions' words)
    freeze_image_iters: int = 0  # the tower and projector wait this many iterations while LoRA learns what to say
    quantize: str = ""  # "" (16-bit base) | nf4 | int8 weight-only base for the instruct stage
    lm_dtype: str = "auto"  # weights of the frozen LM and tower: auto (bfloat16 on a GPU, float32 on a CPU) | ...
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU that has it) | float32 | bfloat16
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    gradient_checkpointing: bool = False  # recompute the LM's blocks in backward (long sequences on a big LM)
    max_len: int = 0  # longest spliced sequence (text + image tokens); 0: the LM's context
    batch_size: int = 32  # records per optimizer step over all processes and micro-steps
    micro_batch_size: int = 0  # records per forward in one process; 0: batch_size // processes
    group_size: int = 0  # records of one image kept together in a batch (the tower runs once for them); 0: all
    max_iters: int = 0  # 0: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4
    vision_lr_scale: float = 1.0  # the tower's learning rate relative to lr
    min_lr: float = 2e-5
    warmup_iters: int = 20
    lr_decay_iters: int = 0  # end of the cosine; 0: max_iters
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 100
    eval_batches: int = 0  # held-out batches per evaluation; 0: the whole held-out set
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: at every evaluation; there is always one at the end
    samples: int = 4  # held-out questions answered (greedy) in the log at every evaluation
    eval_batch_size: int = 256
    eval_max: int = 0  # evaluate on the first eval_max questions only; 0: all
    max_new_tokens: int = 32  # answer length limit for samples and evaluation
    pixel_cache_mb: int = 1024  # keep preprocessed images in memory up to this size (small datasets load once)
    workers: int = 8  # threads that load images
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = False
    eval: bool = False  # only evaluate: --init's checkpoint, else the final one in out_dir

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be {', '.join(STAGES)}, not {self.stage!r}")
        for name in ("val_size", "batch_size", "eval_interval", "log_interval", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, not {getattr(self, name)}")
        for name in ("micro_batch_size", "group_size", "max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval",
                     "weight_decay", "grad_clip", "min_lr", "samples", "eval_max", "eval_batches", "pixel_cache_mb",
                     "max_len", "workers", "vision_lr_scale", "freeze_image_iters"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, not {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, not {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, not {self.epochs}")
        if self.quantize not in ("", "nf4", "int8"):
            raise ValueError(f"--quantize must be empty, nf4 or int8, not {self.quantize!r}")
        for name in ("dtype", "lm_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                raise ValueError(f"--{name} must be auto, float32, bfloat16 or float16, not {getattr(self, name)!r}")
        if self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora_r must be >= 1, --lora_alpha > 0 and --lora_dropout in [0, 1)")
        if self.features and self.train_vision:
            raise ValueError("--features (cached CLIP features) and --train_vision exclude each other: "
                             "a tower that trains changes its features")
        if self.resume and self.eval:
            raise ValueError("--resume and --eval exclude each other")
        if not self.out_dir:
            self.out_dir = f"out/mm-{self.preset}" + ("" if len(STAGES[self.stage]) > 1 else f"/{self.stage}")


# Per preset: "common" settings, then "align" and "instruct" settings on top for that stage.
PRESETS = {
    # this CPU, offline: easy-vqa. A random ViT (images at 32x32, 8x8 patches of 4 pixels, 128 wide) learns from
    # the captions CLIP's way (clip) and is frozen from then on; pooled to 4 tokens, it feeds a random 'demo' Phi
    # with LoRA (the output head too): align trains projector and LoRA on the captions (the projector waits 50
    # iterations while LoRA learns the words), instruct goes on with the questions.
    "demo": {
        "common": dict(stage="all", image_folder=str(EASYVQA / "images"), eval_data=str(EASYVQA / "test.json"),
                       lm="demo", vision="demo",
                       projector="pool4x4_mlp2x_gelu", feature_layer=-1, lora_r=32,
                       lora_alpha=64.0, lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj,dense,fc1,fc2,lm_head",
                       align_lora=True, dtype="bfloat16", val_size=200, samples=4, eval_interval=200,
                       log_interval=20, warmup_iters=20, weight_decay=0.0, group_size=2, max_new_tokens=8),
        "clip": dict(data=str(EASYVQA / "captions.json"), batch_size=128, max_iters=400, lr=1e-3, min_lr=1e-4,
                     eval_interval=100),
        "align": dict(data=str(EASYVQA / "captions.json"), batch_size=64, max_iters=300, lr=1e-3, min_lr=1e-4,
                      freeze_image_iters=50),
        "instruct": dict(data=str(EASYVQA / "train.json"), batch_size=64, max_iters=1200, lr=1e-3, min_lr=1e-4),
    },
    # tests: a tiny LM and tower from random weights, a few iterations
    "tiny": {
        "common": dict(stage="both", lm="tiny", vision="tiny", projector="mlp2x_gelu",
                       train_vision=True, lora_r=4, lora_alpha=8.0, lora_dropout=0.0, batch_size=4, max_iters=4,
                       lr=3e-3, min_lr=3e-4, warmup_iters=1, val_size=4, samples=2, eval_interval=2, log_interval=1,
                       eval_batch_size=8, max_new_tokens=4, workers=2),
    },
    # LLaVA-1.5 recipe on GPUs: Phi-2 + CLIP ViT-L/14-336, frozen tower; QLoRA-ready instruct stage
    "llava": {
        "common": dict(stage="align", lm="microsoft/phi-2", vision="openai/clip-vit-large-patch14-336",
                       projector="mlp2x_gelu",
                       feature_layer=-2, pad_to_square=True, max_len=2048, eval_interval=500, log_interval=10,
                       samples=4, warmup_iters=0, weight_decay=0.0),
        "align": dict(batch_size=256, micro_batch_size=32, epochs=1.0, lr=1e-3, min_lr=0.0, warmup_iters=70),
        "instruct": dict(batch_size=128, micro_batch_size=8, epochs=1.0, lr=2e-4, min_lr=0.0, warmup_iters=150,
                         lora_r=128, lora_alpha=256.0, lora_dropout=0.05, gradient_checkpointing=True),
    },
}


def stage_configs(argv):
    """The MMConfig of every stage to run: the preset's common settings, its stage settings, then the command line.
    With --init, the LM and tower are the init checkpoint's unless --lm / --vision are on the command line."""
    def flat(stage):
        return {name: {**p.get("common", {}), **p.get(stage, {})} for name, p in PRESETS.items()}

    given = parse_options(MMConfig, argv)
    preset = PRESETS.get(given.get("preset", MMConfig.preset), {})
    stage = given.get("stage", preset.get("common", {}).get("stage", MMConfig.stage))
    first = parse_config(MMConfig, argv, flat(STAGES.get(stage, (stage,))[-1]))  # the run as a whole
    configs = [replace(parse_config(MMConfig, argv, flat(stage)), stage=stage) for stage in STAGES[first.stage]]
    for cfg in configs:
        if not cfg.data and not cfg.eval:
            raise ValueError(f"--data is required for the {cfg.stage} stage (a LLaVA JSON)")
        if cfg.init:
            cfg.lm, cfg.vision = (cfg.lm if "lm" in given else ""), (cfg.vision if "vision" in given else "")
    if len(configs) > 1:  # each stage in its own folder, starting from the one before
        base = Path(first.out_dir)
        for before, cfg in zip([None] + configs, configs):
            cfg.out_dir = str(base / cfg.stage)
            if before is not None and before.stage == "clip":
                cfg.vision = str(base / "clip" / "ckpt" / "vision")
            elif before is not None:
                cfg.init, cfg.lm, cfg.vision = str(base / before.stage / "ckpt"), "", ""
    return first, configs


# ---- data ------------------------------------------------------------------------------------------------------


@functools.cache
def llava_prepare():
    """data/llava/prepare.py as a module (it owns the LLaVA JSON checks)."""
    spec = importlib.util.spec_from_file_location("data_llava_prepare", REPO / "data" / "llava" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_checked(path, cfg, d, log):
    """The good records of a LLaVA JSON. The master process checks (and images are opened) once; every process gets
    the same list, or the same error."""
    prep = llava_prepare()
    records = prep.load_records(path)
    result = [None]
    if d.master:
        try:
            good, report = prep.validate(records, cfg.image_folder, skip_bad=cfg.skip_bad,
                                         check_images=cfg.check_images, workers=cfg.workers, source=str(path))
            log(prep.format_report(report))
            keep = {id(r) for r in good}
            result = [("ok", [i for i, r in enumerate(records) if id(r) in keep])]
        except (ValueError, FileNotFoundError) as err:
            result = [("error", (type(err).__name__, str(err)))]
    if d.world > 1:
        dist.broadcast_object_list(result, src=0)
    status, payload = result[0]
    if status == "error":
        raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}[payload[0]](payload[1])
    return [records[i] for i in payload]


def split_off(records, n, seed):
    """(train, held-out): whole images (all their records) are held out until at least n records are."""
    groups = group_by_image(records)
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    held, count = set(), 0
    for g in order:
        if count >= n:
            break
        held.add(g)
        count += len(groups[g])
    if len(held) == len(groups):
        raise ValueError(f"cannot hold out {n} records for validation: the data has only {len(records)} records "
                         f"of {len(groups)} images; lower --val_size or pass --val_data")
    val = [records[i] for g in sorted(held) for i in groups[g]]
    train = [records[i] for g in range(len(groups)) if g not in held for i in groups[g]]
    return train, val


def group_by_image(records):
    """Lists of record indices that share an image, in first-seen order; a text-only record is a group of its own."""
    groups, where = [], {}
    for i, r in enumerate(records):
        key = r.get("image")
        if key is None:
            groups.append([i])
        elif key in where:
            groups[where[key]].append(i)
        else:
            where[key] = len(groups)
            groups.append([i])
    return groups


def encode_record(tokenizer, record, image_tokens, max_len):
    """(ids, labels, truncated) of a record in the chat template: labels are the ids of assistant tokens (answers
    and their <|endoftext|>), -100 elsewhere. A sequence longer than max_len (image counted as image_tokens) is cut
    before the token that does not fit; an image that does not fit whole is dropped with everything after it."""
    messages = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record["conversations"]]
    ids, is_target = encode_chat(tokenizer, messages, add_generation_prompt=False)
    labels = [t if m else IGNORE for t, m in zip(ids, is_target)]
    length = 0
    for k, t in enumerate(ids):
        size = image_tokens if t == IMAGE_TOKEN_ID else 1
        if length + size > max_len:
            return ids[:k], labels[:k], True
        length += size
    return ids, labels, False


@dataclass
class Batch:
    ids: list  # token id rows, IMAGE_TOKEN_ID where an image goes
    labels: list  # aligned with ids: the id to learn or -100
    images: list  # the distinct image paths of the batch
    image_index: list  # for every IMAGE_TOKEN_ID in reading order: its position in images
    n_targets: int
    n_tokens: int  # spliced positions
    truncated: int  # records cut at max_len


class LlavaData:
    """Records in a deterministic order: each epoch shuffles the images and the records within an image, and keeps
    up to group_size records of one image next to each other, so a batch runs the tower once per image."""

    def __init__(self, records, tokenizer, image_tokens, max_len, seed, group_size=0):
        self.records, self.tokenizer = records, tokenizer
        self.image_tokens, self.max_len, self.seed, self.group_size = image_tokens, max_len, seed, group_size
        self.groups = group_by_image(records)
        self._orders = {}

    def __len__(self):
        return len(self.records)

    def order(self, epoch):
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            chunks = []
            for group in self.groups:
                members = [group[p] for p in torch.randperm(len(group), generator=generator).tolist()]
                size = self.group_size or len(members)
                chunks += [members[k:k + size] for k in range(0, len(members), size)]
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}  # a batch may span two
            self._orders[epoch] = [i for c in torch.randperm(len(chunks), generator=generator).tolist() for i in chunks[c]]
        return self._orders[epoch]

    def indices(self, it, batch_size):
        """Record indices of iteration it's global batch (epochs follow each other without a gap)."""
        out = []
        for pos in range(it * batch_size, (it + 1) * batch_size):
            epoch, offset = divmod(pos, len(self.records))
            out.append(self.order(epoch)[offset])
        return out

    def batch(self, indices):
        ids, labels, images, image_index, n_targets, n_tokens, truncated = [], [], [], [], 0, 0, 0
        where = {}
        for i in indices:
            record = self.records[i]
            row, row_labels, cut = encode_record(self.tokenizer, record, self.image_tokens, self.max_len)
            if IMAGE_TOKEN_ID in row:
                path = record["image"]
                if path not in where:
                    where[path] = len(images)
                    images.append(path)
                image_index.append(where[path])
            ids.append(row)
            labels.append(row_labels)
            n_targets += sum(1 for t in row_labels if t != IGNORE)
            n_tokens += len(row) + (self.image_tokens - 1) * row.count(IMAGE_TOKEN_ID)
            truncated += cut
        return Batch(ids, labels, images, image_index, n_targets, n_tokens, truncated)


class ImageSource:
    """Images by path relative to the image folder: preprocessed pixels (kept in memory up to a budget), or the
    features of a CLIP feature cache."""

    def __init__(self, folder, processor=None, pad_to_square=False, cache=None, memo_mb=1024, workers=8):
        self.folder, self.processor, self.pad_to_square, self.cache = Path(folder or "."), processor, pad_to_square, cache
        self.memo, self.memo_bytes, self.memo_budget = {}, 0, memo_mb * 2 ** 20
        self.pool = ThreadPoolExecutor(max(1, workers)) if workers else None

    def _pixels(self, path):
        if path in self.memo:
            return self.memo[path]
        try:
            image = load_image(self.folder / path)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"cannot use image {self.folder / path}: {err}") from None
        pixels = preprocess([image], self.processor, pad_to_square=self.pad_to_square)[0]
        size = pixels.numel() * pixels.element_size()
        if self.memo_bytes + size <= self.memo_budget:
            self.memo[path] = pixels
            self.memo_bytes += size
        return pixels

    def get(self, paths, device):
        """{'pixels': (n, 3, S, S)} or {'features': (n, N, D)} for the paths."""
        if not paths:
            return {}
        if self.cache is not None:
            missing = [p for p in paths if p not in self.cache]
            if missing:
                raise ValueError(f"image {missing[0]} is not in the feature cache {self.cache.folder} "
                                 f"({len(missing)} of this batch's {len(paths)} images are missing)")
            return {"features": torch.stack([self.cache.get(p) for p in paths]).to(device)}
        todo = [p for p in paths if p not in self.memo]
        if self.pool is not None and len(todo) > 1:
            loaded = dict(zip(todo, self.pool.map(self._pixels, todo)))
        else:
            loaded = {p: self._pixels(p) for p in todo}
        return {"pixels": torch.stack([loaded[p] if p in loaded else self.memo[p] for p in paths]).to(device)}


# ---- the model -------------------------------------------------------------------------------------------------


class MultimodalLM(nn.Module):
    """Vision tower (absent when features are cached), projector and language model. forward gives the summed
    cross-entropy of a batch's target tokens; the output head runs only on those positions."""

    def __init__(self, lm, projector, vision=None, feature_layer=-2, train_vision=False):
        super().__init__()
        self.lm, self.projector, self.vision = lm, projector, vision
        self.feature_layer, self.train_vision = feature_layer, train_vision

    def image_embeddings(self, pixels=None, features=None):
        """(n_images, image_tokens, lm_dim) from pixels (the tower runs, with gradients only if it trains) or cached
        features."""
        if features is None:
            with torch.set_grad_enabled(self.train_vision and torch.is_grad_enabled()):
                features = self.vision.features(pixels.to(self.vision.dtype), layer=self.feature_layer)
        return self.projector(features)

    def splice(self, ids, image_index, images, labels=None, padding_side="right"):
        embeds = self.image_embeddings(**images) if image_index else None
        return splice_image_features(ids, self.lm.model.embed_tokens, [embeds[k] for k in image_index],
                                     targets=labels, pad_id=Tokenizer.eos_id, padding_side=padding_side)

    def forward(self, ids, labels, image_index, images):
        spliced = self.splice(ids, image_index, images, labels)
        # right padding: causal attention alone already keeps every real position away from the padding after it
        hidden = self.lm.hidden_states(inputs_embeds=spliced.inputs_embeds)
        rows = spliced.targets != IGNORE
        if not rows.any():
            return hidden.sum() * 0.0
        logits = self.lm.lm_head(hidden[rows]).float()
        return F.cross_entropy(logits, spliced.targets[rows], reduction="sum")

    @torch.no_grad()
    def answer(self, prompts, images, max_new_tokens, tokenizer):
        """Greedy answers to prompts [(messages, image path or None)], images an ImageSource: the text of each up
        to <|endoftext|>."""
        device = self.lm.model.embed_tokens.weight.device
        ids, paths, image_index = [], [], []
        for messages, path in prompts:
            row, _ = encode_chat(tokenizer, messages)
            if IMAGE_TOKEN_ID in row:
                if path is None:
                    raise ValueError("a prompt has an <image> placeholder but no image")
                if path not in paths:
                    paths.append(path)
                image_index.append(paths.index(path))
            ids.append(row)
        spliced = self.splice(ids, image_index, images.get(paths, device), padding_side="left")
        room = self.lm.config.max_position_embeddings - spliced.inputs_embeds.shape[1]
        if room < 1:
            raise ValueError(f"a prompt of {spliced.inputs_embeds.shape[1]} positions leaves no room to answer in the "
                             f"context of {self.lm.config.max_position_embeddings}")
        new = self.lm.generate(inputs_embeds=spliced.inputs_embeds, attention_mask=spliced.attention_mask,
                               max_new_tokens=min(max_new_tokens, room), temperature=0, eos_id=tokenizer.eos_id)
        answers = []
        for row in new.tolist():
            row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            answers.append(tokenizer.decode(row).strip())
        return answers


class CaptionEncoder(nn.Module):
    """The text side of the contrastive stage: the mean of a caption's token embeddings, projected. A bag of words
    says everything in a caption like "A red circle."; CLIP itself has a text transformer here."""

    def __init__(self, vocab_size, dim):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        mask = mask.unsqueeze(-1).to(self.proj.weight.dtype)
        return self.proj((self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


class ContrastiveTower(nn.Module):
    """CLIP's objective, for a tower from random weights: the embeddings of an image and its caption meet, those of
    other pairs in the batch part (pairs with the same caption count as matches). The image embedding is the mean
    of the patch features the projector will read (feature_layer), so those are what learns."""

    def __init__(self, vision, feature_layer, vocab_size):
        super().__init__()
        width = vision.config.hidden_size
        self.vision, self.feature_layer = vision, feature_layer
        self.text = CaptionEncoder(vocab_size, width)
        self.visual_projection = nn.Linear(width, width, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def image_embeddings(self, pixels):
        image = self.visual_projection(self.vision.features(pixels, layer=self.feature_layer).mean(1))
        return F.normalize(image.float(), dim=-1)

    def caption_embeddings(self, ids, mask):
        return F.normalize(self.text(ids, mask).float(), dim=-1)

    def forward(self, pixels, ids, mask, caption_index):
        """(loss, the images' embeddings); caption_index[i] identifies image i's caption text."""
        image, text = self.image_embeddings(pixels), self.caption_embeddings(ids, mask)
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (caption_index[:, None] == caption_index[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2, image


# ---- building the parts ------------------------------------------------------------------------------------------


def torch_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_ref(folder, ref):
    """A path in an mm_config: relative paths are relative to the checkpoint folder."""
    p = Path(ref)
    return str(folder / p) if not p.is_absolute() and (folder / p).exists() else str(ref)


def portable_ref(ref):
    """What an mm_config records for a model: an absolute path for a local folder, else the hub id as given."""
    return str(Path(ref).resolve()) if Path(ref).is_dir() else str(ref)


def read_mm_config(folder):
    file = Path(folder) / "mm_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a multimodal checkpoint (no mm_config.json)")
    return json.loads(file.read_text())


@dataclass
class Parts:
    lm: Phi
    projector: nn.Module
    vision: CLIPVision | None
    lm_ref: str  # what mm_config says for "lm"
    vision_ref: str  # an external tower's path or hub id, or "" when the tower is saved inside the checkpoint
    vision_meta: dict  # vision_dim, num_patches, processor (for the feature cache and preprocessing)
    feature_layer: int
    pad_to_square: bool


def load_lm(cfg, ref, d, log, out_dir):
    """The base LM: an HF folder or hub id; or, for a model.py preset name, random weights saved once to
    out_dir/random_{preset} so that checkpoints can name them."""
    dtype = torch_dtype(cfg.lm_dtype, d.device)
    quantize = (cfg.quantize or None) if cfg.stage == "instruct" else None
    if ref in MODEL_PRESETS and not Path(ref).exists():
        folder = Path(out_dir) / f"random_{ref}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(cfg.seed)
            model = Phi(PhiConfig.from_preset(ref))
            if d.master:
                save_checkpoint(out_dir, model.save_pretrained, name=folder.name)
            d.barrier()
        log(f"language model: a '{ref}' Phi with random weights (saved in {folder}); only LoRA adapters train on it")
        ref = str(folder)
    lm = Phi.from_pretrained(ref, dtype=dtype, device=d.device, quantize=quantize)
    return lm, portable_ref(ref)


def load_vision(cfg, ref, d):
    """(tower, source): a CLIP folder or hub id, or a clip_encoder preset name for random weights (source None)."""
    dtype = torch.float32 if cfg.train_vision else torch_dtype(cfg.lm_dtype, d.device)
    if ref in CLIP_PRESETS and not Path(ref).exists():
        vision = CLIPVision(CLIPVisionConfig.from_preset(ref, **tower_overrides(cfg.vision_config)))
        vision.init_weights(seed=cfg.seed)
        return vision.to(device=d.device, dtype=dtype), None
    return CLIPVision.from_pretrained(ref, dtype=dtype, device=d.device), ref


def tower_overrides(text):
    """'hidden_size=128,intermediate_size=512' -> {'hidden_size': 128, 'intermediate_size': 512} (CLIPVisionConfig)."""
    types = {f.name: f.type for f in fields(CLIPVisionConfig)}
    overrides = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in types or not value:
            raise ValueError(f"--vision_config: {item!r} is not name=value with a name from {', '.join(types)}")
        try:
            overrides[key.strip()] = types[key.strip()](value)
        except ValueError:
            raise ValueError(f"--vision_config: {key} must be a {types[key.strip()].__name__}, not {value!r}") from None
    return overrides


def build_parts(cfg, d, log, start=None, resuming=False):
    """LM, projector and tower for a stage: new ones from cfg, or those of the checkpoint `start` (--init, or the
    checkpoint being resumed): its LM, tower, projector and adapter. --lm and --vision replace an --init
    checkpoint's, never those of a run being resumed."""
    mm = read_mm_config(start) if start is not None else {}
    lm_ref = (not resuming and cfg.lm) or (resolve_ref(start, mm["lm"]) if mm else "")
    vision_ref = (not resuming and cfg.vision) or (resolve_ref(start, mm["vision"]) if mm else "")
    if not lm_ref:
        raise ValueError("no language model: pass --lm=FOLDER (or --init=CHECKPOINT)")
    if not vision_ref:
        raise ValueError("no vision tower: pass --vision=FOLDER (or --init=CHECKPOINT)")
    feature_layer = mm.get("feature_layer", cfg.feature_layer)
    pad_to_square = mm.get("pad_to_square", cfg.pad_to_square)
    lm, lm_ref = load_lm(cfg, lm_ref, d, log, cfg.out_dir)
    lm.requires_grad_(False)
    lm.config.gradient_checkpointing = cfg.gradient_checkpointing

    cache_only = bool(cfg.features)
    vision, source = (None, vision_ref) if cache_only else load_vision(cfg, vision_ref, d)
    if cache_only:
        from clip_encoder import tower_identity
        identity, vision_config, processor = tower_identity(vision_ref)
    else:
        vision_config, processor = vision.config, vision.processor
        vision.requires_grad_(cfg.train_vision)
        vision.train(cfg.train_vision)
    # a tower trained here (random, a clip stage's, one saved inside a checkpoint) goes into the checkpoint; a
    # pretrained one (CLIP-L) is named
    inside_start = source is not None and start is not None and Path(source).resolve().is_relative_to(Path(start).resolve())
    from_clip_stage = source is not None and (Path(source).parent / "contrastive.safetensors").is_file()
    external = "" if (cfg.train_vision or source is None or inside_start or from_clip_stage) else portable_ref(source)

    kind = mm.get("projector", cfg.projector)
    if start is not None and (Path(start) / "projector.safetensors").is_file():
        projector = load_projector(Path(start) / "projector.safetensors")
        if (projector.vision_dim, projector.lm_dim) != (vision_config.hidden_size, lm.config.hidden_size):
            raise ValueError(f"the projector in {start} maps {projector.vision_dim} -> {projector.lm_dim}, but the "
                             f"tower is {vision_config.hidden_size} wide and the LM {lm.config.hidden_size}")
    else:
        torch.manual_seed(cfg.seed + 7)
        projector = build_projector(kind, vision_config.hidden_size, lm.config.hidden_size)
    projector.to(d.device).train()

    if trains_lora(cfg):
        if start is not None and (Path(start) / "adapter_config.json").is_file():
            load_adapter(lm, start, quantize=cfg.quantize or None)
        else:
            torch.manual_seed(cfg.seed + 11)
            apply_lora(lm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=tuple(t for t in cfg.lora_targets.split(",") if t), quantize=cfg.quantize or None)
        lm.to(d.device)
    lm.train()
    meta = {"vision_dim": vision_config.hidden_size, "num_patches": vision_config.num_patches, "processor": processor}
    return Parts(lm, projector, vision, lm_ref, external, meta, feature_layer, pad_to_square)


def mm_config_of(parts, stage):
    return {"lm": parts.lm_ref, "vision": parts.vision_ref or "vision", "projector": parts.projector.kind,
            "vision_dim": parts.projector.vision_dim, "lm_dim": parts.projector.lm_dim,
            "feature_layer": parts.feature_layer, "pad_to_square": parts.pad_to_square, "template": TEMPLATE,
            "stage": stage, "image_tokens": num_image_tokens(parts.projector.kind, parts.vision_meta["num_patches"])}


def write_multimodal(folder, parts, stage, train_state=None):
    """Fill a checkpoint folder: mm_config.json, projector.safetensors, vision/ (a tower of our own), the PEFT
    adapter (instruct) and train_state.pt."""
    folder = Path(folder)
    if not parts.vision_ref:
        parts.vision.save_pretrained(folder / "vision")
    save_projector(parts.projector, folder / "projector.safetensors")
    if getattr(parts.lm, "lora_config", None) is not None:
        save_adapter(parts.lm, folder, base_model_name_or_path=parts.lm_ref)
    if train_state is not None:
        torch.save(train_state, folder / "train_state.pt")
    atomic_write(folder / "mm_config.json", json.dumps(mm_config_of(parts, stage), indent=2))


# ---- training ----------------------------------------------------------------------------------------------------


def trains_lora(cfg):
    return cfg.stage == "instruct" or cfg.align_lora


def optimizer_groups(parts, cfg):
    """Projector and LoRA at lr; the tower at lr * vision_lr_scale; no weight decay on biases and LayerNorms."""
    groups = []
    modules = [(parts.projector, 1.0)] + ([(parts.vision, cfg.vision_lr_scale)] if cfg.train_vision else [])
    for module, scale in modules:
        decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2 and "embedding" not in n]
        other = [p for n, p in module.named_parameters() if p.requires_grad and not (p.dim() >= 2 and "embedding" not in n)]
        groups += [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": scale, "image": True},
                   {"params": other, "weight_decay": 0.0, "lr_scale": scale, "image": True}]
    if trains_lora(cfg):
        groups.append({"params": lora_parameters(parts.lm), "weight_decay": cfg.weight_decay, "lr_scale": 1.0,
                       "image": False})
    return [g for g in groups if g["params"]]


def starting_point(cfg, d):
    """(out_dir, the checkpoint to resume or None, its train state or {}, records per process and step)."""
    out_dir = Path(cfg.out_dir)
    checkpoint = find_checkpoint(out_dir) if cfg.resume else None
    if cfg.resume and checkpoint is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {out_dir} (expected {out_dir / 'ckpt' / 'train_state.pt'})")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by the {d.world} processes")
    state = torch.load(checkpoint / "train_state.pt", map_location="cpu", weights_only=False) if checkpoint else {}
    return out_dir, checkpoint, state, cfg.batch_size // d.world


def run_stage(cfg, d, log):
    """Train one stage as configured; returns its checkpoint folder."""
    out_dir, checkpoint, state, per_rank = starting_point(cfg, d)
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"each process takes {per_rank} records per step, not a multiple of --micro_batch_size={micro}")
    accum = per_rank // micro
    if cfg.init and checkpoint is None and not Path(cfg.init).is_dir():
        raise FileNotFoundError(f"--init={cfg.init}: no such checkpoint folder")
    if checkpoint is not None and state["iter"] >= (state.get("max_iters") or math.inf):
        log(f"{cfg.stage}: {checkpoint} is complete ({state['iter']} iterations)")
        return checkpoint

    records = load_checked(cfg.data, cfg, d, log)
    if cfg.val_data:
        train_records, val_records = records, load_checked(cfg.val_data, cfg, d, log)
    else:
        train_records, val_records = split_off(records, cfg.val_size, cfg.seed)
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = build_parts(cfg, d, log, start=checkpoint or (Path(cfg.init) if cfg.init else None),
                        resuming=checkpoint is not None)
    cache = None
    if cfg.features:
        cache = FeatureCache(cfg.features, vision=parts.vision_ref or cfg.vision, layer=parts.feature_layer,
                             pad_to_square=parts.pad_to_square)
    images = ImageSource(cfg.image_folder, parts.vision_meta["processor"], parts.pad_to_square, cache,
                         cfg.pixel_cache_mb, cfg.workers)
    image_tokens = num_image_tokens(parts.projector.kind, parts.vision_meta["num_patches"])
    max_len = cfg.max_len or parts.lm.config.max_position_embeddings
    if max_len > parts.lm.config.max_position_embeddings:
        raise ValueError(f"--max_len={max_len} is longer than the LM's context of {parts.lm.config.max_position_embeddings}")
    tokenizer = Tokenizer()
    data = LlavaData(train_records, tokenizer, image_tokens, max_len, cfg.seed, cfg.group_size)
    val = LlavaData(val_records, tokenizer, image_tokens, max_len, cfg.seed)
    max_iters = cfg.max_iters or math.ceil(cfg.epochs * len(data) / cfg.batch_size)
    autocast = autocast_dtype(cfg.dtype, d.device)

    mm = MultimodalLM(parts.lm, parts.projector, parts.vision, parts.feature_layer, cfg.train_vision)
    raw = mm
    groups = optimizer_groups(parts, cfg)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer,
                               betas=(cfg.beta1, cfg.beta2))
    if d.world > 1:
        text_only = any(r.get("image") is None for r in train_records)
        mm = nn.parallel.DistributedDataParallel(mm, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                                 broadcast_buffers=False, find_unused_parameters=text_only)
    it, truncated_total = 0, 0
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        it, truncated_total = state["iter"], state["truncated"]
        set_rng_state(state["rng"][d.rank] if len(state["rng"]) == d.world else state["rng"][0])
        log(f"resuming {cfg.stage} from {checkpoint} at iter {it}")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    n_trainable = sum(p.numel() for p in trainable)
    log(f"{cfg.stage}: {len(data):,} train / {len(val):,} held-out records, {max_iters} iters of {cfg.batch_size} "
        f"({d.world} processes x {accum} micro-steps x {micro}), {image_tokens} tokens per image, "
        f"{n_trainable / 1e6:.2f}M trainable parameters "
        f"({'projector' + (' + tower' if cfg.train_vision else '') + (' + LoRA' if trains_lora(cfg) else '')}), "
        f"{d.device}, {autocast or torch.float32}, out: {out_dir}", flush=True)
    if cfg.train_vision and parts.vision_ref == "" and cfg.vision in CLIP_PRESETS and checkpoint is None and not cfg.init:
        log(f"note: the vision tower is a '{cfg.vision}' ViT from random weights (no pretrained CLIP offline); "
            "it trains together with the projector")

    def run_eval():
        stats = held_out_loss(raw, val, micro, cfg.eval_batches, images, d, autocast)
        samples = sample_answers(raw, val, cfg.samples, images, cfg.max_new_tokens, tokenizer) if d.master else None
        return stats, samples

    session_start, time_before = time.time(), state.get("train_time_s", 0.0)

    def save():
        rngs = gather_objects(rng_state(), d)
        if d.master:
            train_state = {"iter": it, "max_iters": max_iters, "optimizer": optimizer.state_dict(), "rng": rngs,
                           "config": asdict(cfg), "truncated": truncated_total, "val_loss": state.get("val_loss"),
                           "train_time_s": time_before + time.time() - session_start, "world_size": d.world}
            save_checkpoint(out_dir, lambda folder: write_multimodal(folder, parts, cfg.stage, train_state))
        d.barrier()
        return it

    if checkpoint is None:
        (val_loss, _), samples = run_eval()
        state["val_loss"] = val_loss
        log(f"iter 0: held-out loss {val_loss:.4f}")
        if d.master:
            logbook.write({"iter": 0, "stage": cfg.stage, "train_loss": None, "val_loss": val_loss, "lr": 0.0,
                           "samples": samples})
    saved_at = it if checkpoint is not None else None
    kill_at = int(os.environ.get(KILL_AT_ITER_ENV, -1))
    decay_iters = cfg.lr_decay_iters or max_iters
    interval = {"start": time.time(), "iters": 0, "tokens": 0, "images": 0, "truncated": 0}
    while it < max_iters:
        lr = cosine_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        mine = data.indices(it, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]
        batches = [data.batch(mine[k * micro:(k + 1) * micro]) for k in range(accum)]
        counts = torch.tensor([sum(b.n_targets for b in batches), sum(b.n_tokens for b in batches),
                               sum(len(b.images) for b in batches), sum(b.truncated for b in batches)],
                              dtype=torch.float64, device=d.device)
        if d.world > 1:
            dist.all_reduce(counts)
        n_targets = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for k, b in enumerate(batches):
            gradient_sync(mm, k == accum - 1)
            with torch.autocast(d.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                loss = mm(b.ids, b.labels, b.image_index, images.get(b.images, d.device))
            # DDP averages gradients over processes: scaled by world / global targets, the result is the gradient of
            # the mean over every target token of the global batch
            (loss * (d.world / n_targets)).backward()
            loss_sum += loss.detach().double()
        if d.world > 1:
            dist.all_reduce(loss_sum)
        if it < cfg.freeze_image_iters:
            # no step and no optimizer state yet: a random LM's first gradients ("say these words at all") would
            # collapse a random tower, and would linger in Adam's second moments
            for group in optimizer.param_groups:
                if group.get("image"):
                    for p in group["params"]:
                        p.grad = None
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip or math.inf))
        train_loss = loss_sum.item() / n_targets
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            where = f"{out_dir / 'ckpt'} (iter {saved_at})" if saved_at is not None else "none: no checkpoint was written"
            raise FloatingPointError(f"{'train loss' if not math.isfinite(train_loss) else 'gradient norm'} is not "
                                     f"finite at iter {it + 1}; training stopped, the last good checkpoint is {where}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        truncated_total += int(counts[3].item())
        for key, value in zip(("tokens", "images", "truncated"), counts[1:].tolist()):
            interval[key] += value
        interval["iters"] += 1

        evaluating = it % cfg.eval_interval == 0 or it == max_iters
        if evaluating or it % cfg.log_interval == 0:
            elapsed = max(time.time() - interval["start"], 1e-9)
            row = {"iter": it, "stage": cfg.stage, "train_loss": train_loss, "val_loss": None, "lr": lr,
                   "tokens_per_s": interval["tokens"] / elapsed, "images_per_s": interval["images"] / elapsed,
                   "ms_per_iter": 1000 * elapsed / interval["iters"], "grad_norm": grad_norm,
                   "truncated": int(interval["truncated"]), "truncated_total": truncated_total}
            if evaluating:
                (row["val_loss"], _), row["samples"] = run_eval()
                state["val_loss"] = row["val_loss"]
            log(f"{cfg.stage} iter {it}/{max_iters}: loss {train_loss:.4f}"
                + (f", held-out {row['val_loss']:.4f}" if evaluating else "")
                + f", lr {lr:.2e}, {row['tokens_per_s']:,.0f} tokens/s, {row['images_per_s']:.1f} images/s, "
                f"{row['ms_per_iter']:.0f} ms/iter" + (f", {truncated_total} truncated" if truncated_total else ""),
                flush=True)
            if evaluating and d.master:
                for s in row["samples"] or []:
                    log(f"    [{s['id']}] {s['question']!r} -> {s['answer']!r} (reference {s['reference']!r})")
            if d.master:
                logbook.write(row)
                if evaluating:
                    plot_losses(logbook.rows(), out_dir / "loss.png", f"{cfg.stage} on {Path(cfg.data).name}")
            interval = {"start": time.time(), "iters": 0, "tokens": 0, "images": 0, "truncated": 0}
        if it % (cfg.ckpt_interval or cfg.eval_interval) == 0 or it == max_iters:
            pause = time.time()
            saved_at = save()
            interval["start"] += time.time() - pause
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    if saved_at != it:
        save()
    log(f"{cfg.stage}: done, {it} iterations in {format_seconds(time_before + time.time() - session_start)}; "
        f"checkpoint {out_dir / 'ckpt'}", flush=True)
    return out_dir / "ckpt"


def image_captions(records):
    """[(image path, caption)]: every image record's first answer, a caption in caption data."""
    pairs = []
    for r in records:
        answers = [t["value"] for t in r["conversations"] if t["from"] == "gpt"]
        if r.get("image") is not None and answers:
            pairs.append((r["image"], answers[0].strip()))
    if not pairs:
        raise ValueError("the clip stage needs image records with an answer (a caption); the data has none")
    return pairs


def caption_batch(captions, tokenizer, device):
    """(ids, mask, caption_index) of a list of caption texts; equal texts share a caption_index."""
    distinct = {c: k for k, c in enumerate(dict.fromkeys(captions))}
    rows = [tokenizer.encode(c) or [tokenizer.eos_id] for c in captions]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask, torch.tensor([distinct[c] for c in captions], device=device)


@torch.no_grad()
def clip_eval(model, pairs, images, tokenizer, batch_size, device, autocast):
    """(held-out loss, caption accuracy): the mean contrastive loss over batches of the held-out pairs, and how often
    the nearest of all the held-out captions is an image's own."""
    model.eval()
    texts = list(dict.fromkeys(c for _, c in pairs))
    ids, mask, _ = caption_batch(texts, tokenizer, device)
    with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
        text = model.caption_embeddings(ids, mask)
    losses, correct = [], 0
    for k in range(0, len(pairs), batch_size):
        chunk = pairs[k:k + batch_size]
        pixels = images.get([p for p, _ in chunk], device)["pixels"]
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss, image = model(pixels, *caption_batch([c for _, c in chunk], tokenizer, device))
        nearest = (image @ text.T).argmax(1).tolist()
        correct += sum(texts[n] == c for n, (_, c) in zip(nearest, chunk))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses), correct / len(pairs)


def run_clip_stage(cfg, d, log):
    """Contrastive pretraining of a vision tower (ContrastiveTower) on image-caption pairs; returns the checkpoint
    folder, whose vision/ is a CLIP vision folder for --vision."""
    out_dir, checkpoint, state, per_rank = starting_point(cfg, d)
    if checkpoint is not None and state["iter"] >= state["max_iters"]:
        log(f"clip: {checkpoint} is complete ({state['iter']} iterations)")
        return checkpoint

    train_records, val_records = split_off(load_checked(cfg.data, cfg, d, log), cfg.val_size, cfg.seed)
    if cfg.val_data:
        train_records, val_records = train_records + val_records, load_checked(cfg.val_data, cfg, d, log)
    pairs, val_pairs = image_captions(train_records), image_captions(val_records)
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer()
    vision, _ = load_vision(replace(cfg, train_vision=True), str(checkpoint / "vision") if checkpoint else cfg.vision, d)
    model = ContrastiveTower(vision.requires_grad_(True).train(), cfg.feature_layer, tokenizer.vocab_size).to(d.device)
    if checkpoint is not None:
        from safetensors.torch import load_file
        missing, unexpected = model.load_state_dict(load_file(checkpoint / "contrastive.safetensors", device=str(d.device)),
                                                    strict=False)
        if unexpected or any(not k.startswith("vision.") for k in missing):
            raise ValueError(f"{checkpoint / 'contrastive.safetensors'} does not match the caption encoder")
    images = ImageSource(cfg.image_folder, vision.processor, cfg.pad_to_square, None, cfg.pixel_cache_mb, cfg.workers)
    order = LlavaData([{"image": p} for p, _ in pairs], tokenizer, 0, 0, cfg.seed)  # only its batch order is used
    max_iters = cfg.max_iters or math.ceil(cfg.epochs * len(pairs) / cfg.batch_size)
    autocast = autocast_dtype(cfg.dtype, d.device)
    optimizer = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer,
                               betas=(cfg.beta1, cfg.beta2))
    ddp = model
    if d.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    it = 0
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        it = state["iter"]
        set_rng_state(state["rng"][d.rank] if len(state["rng"]) == d.world else state["rng"][0])
        log(f"resuming clip from {checkpoint} at iter {it}")
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    log(f"clip: {len(pairs):,} train / {len(val_pairs):,} held-out image-caption pairs, {max_iters} iters of "
        f"{cfg.batch_size} ({d.world} processes), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{d.device}, {autocast or torch.float32}, out: {out_dir}", flush=True)
    session_start, time_before = time.time(), state.get("train_time_s", 0.0)

    def evaluate_and_log(row):
        if d.master:
            row["val_loss"], row["caption_accuracy"] = clip_eval(model, val_pairs, images, tokenizer, cfg.eval_batch_size,
                                                                 d.device, autocast)
            log(f"clip iter {row['iter']}/{max_iters}: held-out loss {row['val_loss']:.4f}, held-out images whose "
                f"nearest caption is their own {100 * row['caption_accuracy']:.1f}%", flush=True)
            logbook.write(row)
            plot_losses(logbook.rows(), out_dir / "loss.png", f"clip on {Path(cfg.data).name}")

    def save():
        rngs = gather_objects(rng_state(), d)
        if d.master:
            from safetensors.torch import save_file
            train_state = {"iter": it, "max_iters": max_iters, "optimizer": optimizer.state_dict(), "rng": rngs,
                           "config": asdict(cfg), "train_time_s": time_before + time.time() - session_start,
                           "world_size": d.world}

            def write(folder):
                vision.save_pretrained(folder / "vision")
                save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("vision.")},
                          str(folder / "contrastive.safetensors"))
                torch.save(train_state, folder / "train_state.pt")
            save_checkpoint(out_dir, write)
        d.barrier()

    if checkpoint is None:
        evaluate_and_log({"iter": 0, "stage": "clip", "train_loss": None, "lr": 0.0})
    kill_at = int(os.environ.get(KILL_AT_ITER_ENV, -1))
    start, first_it = time.time(), it
    while it < max_iters:
        lr = cosine_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.lr_decay_iters or max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        chunk = [pairs[i] for i in order.indices(it, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]]
        pixels = images.get([p for p, _ in chunk], d.device)["pixels"]
        with torch.autocast(d.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss, _ = ddp(pixels, *caption_batch([c for _, c in chunk], tokenizer, d.device))
        loss.backward()  # each process's own batch is contrasted; DDP averages the gradients
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf))
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm)):
            raise FloatingPointError(f"the clip loss or its gradient is not finite at iter {it + 1}; training stopped")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        if it % cfg.log_interval == 0 or it % cfg.eval_interval == 0 or it == max_iters:
            row = {"iter": it, "stage": "clip", "train_loss": loss.item(), "lr": lr, "grad_norm": grad_norm,
                   "ms_per_iter": 1000 * (time.time() - start) / (it - first_it)}
            log(f"clip iter {it}/{max_iters}: loss {row['train_loss']:.4f}, lr {lr:.2e}", flush=True)
            if it % cfg.eval_interval == 0 or it == max_iters:
                evaluate_and_log(row)
            elif d.master:
                logbook.write(row)
        if it % (cfg.ckpt_interval or cfg.eval_interval) == 0 or it == max_iters:
            save()
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    log(f"clip: done, {it} iterations in {format_seconds(time_before + time.time() - session_start)}; "
        f"checkpoint {out_dir / 'ckpt'}", flush=True)
    return out_dir / "ckpt"


@torch.no_grad()
def held_out_loss(mm, val, micro, max_batches, images, d, autocast):
    """(mean loss per target token, number of targets) over the held-out records; process r takes every world-th."""
    was_training = mm.training
    mm.eval()
    mine = list(range(len(val)))[d.rank::d.world]
    chunks = [mine[k:k + micro] for k in range(0, len(mine), micro)]
    if max_batches:
        chunks = chunks[:max_batches]
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    for chunk in chunks:
        b = val.batch(chunk)
        with torch.autocast(d.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            loss = mm(b.ids, b.labels, b.image_index, images.get(b.images, d.device))
        total += torch.tensor([loss.item(), b.n_targets], dtype=torch.float64, device=d.device)
    if d.world > 1:
        dist.all_reduce(total)
    mm.train(was_training)
    if mm.vision is not None and not mm.train_vision:
        mm.vision.eval()
    return total[0].item() / max(total[1].item(), 1.0), int(total[1].item())


def sample_answers(mm, val, n, images, max_new_tokens, tokenizer):
    """Greedy answers to the first question of the first n held-out records."""
    if n == 0:
        return []
    was_training = mm.training
    mm.eval()
    records, seen = [], set()  # one question per image first, so that the samples show different images
    for r in val.records:
        if len(records) < n and r.get("image") not in seen:
            records.append(r)
            seen.add(r.get("image"))
    records += [r for r in val.records if r not in records][:n - len(records)]
    prompts = [([{"role": "user", "content": r["conversations"][0]["value"]}], r.get("image")) for r in records]
    try:
        answers = mm.answer(prompts, images, max_new_tokens, tokenizer)
    finally:
        mm.train(was_training)
        if mm.vision is not None and not mm.train_vision:
            mm.vision.eval()
    return [{"id": str(r.get("id")), "question": r["conversations"][0]["value"], "answer": a,
             "reference": r["conversations"][1]["value"]} for r, a in zip(records, answers)]


# ---- evaluation ------------------------------------------------------------------------------------------------


def normalize(answer):
    return answer.strip().lower().removesuffix(".").strip()


def evaluate(cfg, checkpoint, d, log):
    """Exact-match accuracy of greedy answers to the first question of every eval record, per answer_type; loads
    the checkpoint the way generate.py does. Writes eval.json beside the run and prints a markdown table."""
    from generate import ChatModel

    if not cfg.eval_data:
        raise ValueError("--eval needs --eval_data (a LLaVA JSON of questions with reference answers)")
    start = time.time()
    records = load_checked(cfg.eval_data, cfg, d, log)
    if cfg.eval_max:
        records = records[:cfg.eval_max]
    dtype = "bfloat16" if d.device.type == "cuda" else None
    chat = ChatModel(None, mm=checkpoint, device=str(d.device), dtype=dtype)
    c = chat.mm_config
    mm = MultimodalLM(chat.model, chat.projector, chat.vision, c.get("feature_layer", -2)).eval()
    images = ImageSource(cfg.image_folder, chat.vision.processor, c.get("pad_to_square", False), None,
                         cfg.pixel_cache_mb, cfg.workers)
    order = sorted(range(len(records)), key=lambda i: (str(records[i].get("image")), i))[d.rank::d.world]
    results = []
    for k in range(0, len(order), cfg.eval_batch_size):
        chunk = [records[i] for i in order[k:k + cfg.eval_batch_size]]
        prompts = [([{"role": "user", "content": r["conversations"][0]["value"]}], r.get("image")) for r in chunk]
        answers = mm.answer(prompts, images, cfg.max_new_tokens, chat.tokenizer)
        results += [(str(r.get("id")), r.get("answer_type", "all"), r["conversations"][1]["value"], a)
                    for r, a in zip(chunk, answers)]
    results = [x for part in gather_objects(results, d) for x in part]
    if not d.master:
        return None
    counts = {}
    for _, kind, reference, answer in results:
        row = counts.setdefault(kind, {"n": 0, "correct": 0})
        row["n"] += 1
        row["correct"] += normalize(answer) == normalize(reference)
    n, correct = len(results), sum(r["correct"] for r in counts.values())
    wrong = [{"id": i, "reference": ref, "answer": a} for i, _, ref, a in results if normalize(a) != normalize(ref)]
    report = {"checkpoint": str(checkpoint), "data": cfg.eval_data, "accuracy": correct / max(n, 1), "n": n,
              "correct": correct, "by_type": {k: r["correct"] / r["n"] for k, r in sorted(counts.items())},
              "counts": dict(sorted(counts.items())), "seconds": time.time() - start, "wrong_examples": wrong[:50]}
    out = Path(cfg.out_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(report, indent=2))
    lines = ["| answer type | questions | correct | accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {kind} | {r['n']:,} | {r['correct']:,} | {100 * r['correct'] / r['n']:.2f}% |"
              for kind, r in sorted(counts.items())]
    lines.append(f"| **all** | {n:,} | {correct:,} | **{100 * report['accuracy']:.2f}%** |")
    print(f"\nexact-match accuracy of {checkpoint} on {cfg.eval_data} ({format_seconds(report['seconds'])}):\n")
    print("\n".join(lines) + "\n", flush=True)
    print(f"wrote {out}")
    return report


# ---- main -----------------------------------------------------------------------------------------------------


def final_checkpoint(first):
    out = Path(first.out_dir)
    return find_checkpoint(out / STAGES[first.stage][-1] if len(STAGES[first.stage]) > 1 else out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        first, configs = stage_configs(argv)
        d = setup_distributed(first.device)
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"train_mm.py: error: {err}")
    log = print if d.master else (lambda *a, **k: None)
    try:
        start = time.time()
        if first.eval:
            checkpoint = Path(first.init) if first.init else final_checkpoint(first)
            if checkpoint is None:
                raise FileNotFoundError(f"--eval: no checkpoint in {first.out_dir}; train first or pass --init=CHECKPOINT")
            evaluate(first, checkpoint, d, log)
            return
        if first.preset == "demo" and Path(first.image_folder).resolve() == (EASYVQA / "images").resolve():
            if d.master:
                spec = importlib.util.spec_from_file_location("easyvqa_prepare", REPO / "data" / "easyvqa" / "prepare.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                module.prepare(EASYVQA, log=log)
            d.barrier()
        checkpoint = None
        for cfg in configs:
            if len(configs) > 1 and cfg.resume:  # resume the stage that was interrupted; start the next one
                cfg.resume = find_checkpoint(cfg.out_dir) is not None
            checkpoint = (run_clip_stage if cfg.stage == "clip" else run_stage)(cfg, d, log)
        if first.eval_data and first.stage != "clip":
            evaluate(replace(configs[-1], out_dir=first.out_dir), checkpoint, d, log)
        log(f"total wall time {format_seconds(time.time() - start)}")
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        sys.exit(f"train_mm.py: error: {err}")
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
