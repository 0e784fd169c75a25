"""
Multimodal training, LLaVA style. Stage `align`: the vision tower and the language model are frozen and only the
projector learns, on captions. Stage `instruct`: the projector and LoRA adapters on a 16-bit or NF4 base learn to
answer, on multi-turn conversations. The loss covers only the assistant's answers and the <|endoftext|> after each.
`--stage=both` runs align, then instruct from its checkpoint. The tower stays frozen; for a tower from random weights
(the offline demo), train_clip.py trains one first.

    python train_mm.py                                    # offline demo on a CPU (after train_clip.py): align, instruct, eval
    python train_mm.py --eval                             # evaluate the demo checkpoint again

    torchrun --nproc_per_node=8 train_mm.py --preset=llava --stage=align \\
        --data=data/llava/blip_laion_cc_sbu_558k.json --image_folder=data/llava/pretrain_images --features=...
    torchrun --nproc_per_node=8 train_mm.py --preset=llava --stage=instruct --init=out/mm-llava/align \\
        --data=data/llava/llava_instruct_150k.json --image_folder=data/coco/train2017 --quantize=nf4

Options are --key=value overrides of MMConfig on top of a preset (--help lists them). The data is LLaVA JSON (see
data/llava/README.md), checked before the first step. Iteration i's batch is a function of (seed, i), so a run resumes
exactly (--resume) and N processes train like one. The run folder gets log.jsonl (with held-out loss and sample
answers), loss.png and ckpt/, a multimodal checkpoint (multimodal.py) that generate.py, serve.py and eval_mm.py load.

The demo trains a random 'demo' Phi whole (--full_lm: LoRA on a random LM learns too little) with the projector on
easy-vqa's questions (train_demo.json: the colour questions that name the picture's colour three times, since the
comparison is learnt colour by colour from those alone; README), the tower frozen.
"""

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from clip_encoder import CLIP_PRESETS, FeatureCache, tower_identity
from common import (JsonlLog, LoopConfig, all_reduce, autocast, autocast_dtype, batch_split, close_distributed,
                    find_checkpoint, format_seconds, gather_objects, gradient_sync, help_text, load_train_state,
                    parse_config, parse_options, plot_losses, prepare_once, reported_errors, restore_rng,
                    return_freed_memory, rng_state, run_checkpoint, save_checkpoint, seed_everything,
                    setup_distributed, train_loop, wants_help, wrap_ddp)
from common import KILL_AT_ITER_ENV  # noqa: F401 (the resume tests set it)
from lora import apply_lora, load_adapter, lora_parameters, make_optimizer, quantizer
from llava_data import ImageSource, LlavaData, load_checked, split_off
from model import PRESETS as MODEL_PRESETS
from model import Phi, PhiConfig, atomic_write
from multimodal import MultimodalLM, find_mm_checkpoint, load_vision, portable_ref, read_mm_config, resolve_ref
from projector import build_projector, load_projector
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
EASYVQA = REPO / "data" / "easyvqa" / "prepared"
STAGES = {"align": ("align",), "instruct": ("instruct",), "both": ("align", "instruct")}


@dataclass
class MMConfig(LoopConfig):
    preset: str = "demo"  # a PRESETS entry that sets the defaults (per stage); options on the command line win
    stage: str = "both"  # align | instruct | both (align, then instruct from its checkpoint)
    data: str = ""  # LLaVA JSON to train on
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    val_data: str = ""  # held-out LLaVA JSON; empty: whole images with about val_size records are split off --data
    val_size: int = 256  # records held out for the held-out loss when no val_data is given
    eval_data: str = ""  # single-turn questions (LLaVA JSON) for --eval and the evaluation after training
    skip_bad: bool = False  # leave out bad records (listed) instead of stopping
    check_images: str = "open"  # how the data check looks at images: open | decode | exists | none
    lm: str = ""  # base LM folder or hub id, or a model.py preset name: random weights (with --init: its LM)
    vision: str = ""  # CLIP folder or hub id (train_clip.py's tower: its ckpt/vision), or a clip_encoder preset: random
    init: str = ""  # a multimodal checkpoint to continue from (instruct starts from the align checkpoint)
    out_dir: str = ""  # empty: out/mm-{preset}/{stage} (--stage=both: out/mm-{preset} with align/ and instruct/)
    features: str = ""  # a CLIP feature cache (data/coco/cache_features.py) made for the same tower and layer
    projector: str = "mlp2x_gelu"  # linear | mlp2x_gelu | pool2x2_mlp2x_gelu
    feature_layer: int = -2  # the tower layer whose patch features the projector reads (-2: LLaVA's penultimate)
    pad_to_square: bool = False  # pad images to a square (LLaVA-1.5) before resizing, instead of a center crop
    full_lm: bool = False  # the LM's own weights train (all of them), not LoRA: for a small LM from random weights
    lora_r: int = 64  # LoRA rank
    lora_alpha: float = 16.0  # LoRA scaling numerator (the update is scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on LoRA's input
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
    epochs: float = 1.0  # passes over the data when max_iters is 0
    eval_batches: int = 0  # held-out batches per evaluation; 0: the whole held-out set
    samples: int = 4  # held-out questions answered (greedy) in the log at every evaluation
    eval_batch_size: int = 256  # questions answered per batch in evaluation
    eval_max: int = 0  # evaluate on the first eval_max questions only; 0: all
    max_new_tokens: int = 32  # answer length limit for samples and evaluation
    pixel_cache_mb: int = 1024  # keep preprocessed images in memory up to this size (small datasets load once)
    workers: int = 8  # threads that load images
    eval: bool = False  # only evaluate: --init's checkpoint, else the final one in out_dir

    def __post_init__(self):
        super().__post_init__()
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be {', '.join(STAGES)}, not {self.stage!r}")
        self.check_at_least(1, "val_size", "batch_size", "eval_batch_size", "max_new_tokens")
        self.check_at_least(0, "micro_batch_size", "group_size", "samples", "eval_max", "eval_batches",
                            "pixel_cache_mb", "max_len", "workers", "freeze_image_iters")
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, not {self.epochs}")
        if self.quantize not in ("", "nf4", "int8"):
            raise ValueError(f"--quantize must be empty, nf4 or int8, not {self.quantize!r}")
        for name in ("dtype", "lm_dtype"):
            if getattr(self, name) not in ("auto", "float32", "bfloat16", "float16"):
                raise ValueError(f"--{name} must be auto, float32, bfloat16 or float16, not {getattr(self, name)!r}")
        if self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("--lora_r must be >= 1, --lora_alpha > 0 and --lora_dropout in [0, 1)")
        if self.resume and self.eval:
            raise ValueError("--resume and --eval exclude each other")
        if self.full_lm and self.quantize:
            raise ValueError("--full_lm trains the LM's own weights: they cannot be quantized (--quantize)")
        if not self.out_dir:
            self.out_dir = f"out/mm-{self.preset}" + ("" if len(STAGES[self.stage]) > 1 else f"/{self.stage}")


# Per preset: "common" settings, then "align" and "instruct" settings on top for that stage.
PRESETS = {
    # this CPU, offline: easy-vqa. The tower is train_clip.py's (a ViT from random weights that learnt from the
    # captions CLIP's way), frozen; pooled to 4 tokens, it feeds a random 'demo' Phi that trains whole on the
    # questions (instruct only: the caption stage slows the comparison down). The align settings serve --stage=both.
    "demo": {
        "common": dict(stage="instruct", image_folder=str(EASYVQA / "images"), eval_data=str(EASYVQA / "test.json"),
                       lm="demo", vision="out/mm-demo/clip/ckpt/vision", full_lm=True, beta2=0.95,
                       projector="pool4x4_mlp2x_gelu", feature_layer=-1, lora_r=32,
                       lora_alpha=64.0, lora_dropout=0.0, lora_targets="q_proj,k_proj,v_proj,dense,fc1,fc2,lm_head",
                       align_lora=True, dtype="float32", val_size=200, samples=4, eval_interval=200,
                       log_interval=20, warmup_iters=20, weight_decay=0.0, group_size=2, max_new_tokens=8),
        "align": dict(data=str(EASYVQA / "captions.json"), batch_size=64, max_iters=100, lr=1e-3, min_lr=1e-4,
                      freeze_image_iters=30),
        "instruct": dict(data=str(EASYVQA / "train_demo.json"), batch_size=64, max_iters=1000, lr=1e-3, min_lr=1e-4),
    },
    # tests: a tiny LM and tower from random weights, a few iterations
    "tiny": {
        "common": dict(stage="both", lm="tiny", vision="tiny", projector="mlp2x_gelu", lora_r=4, lora_alpha=8.0, lora_dropout=0.0, batch_size=4, max_iters=4,
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
            if before is not None:
                cfg.init, cfg.lm, cfg.vision = str(base / before.stage / "ckpt"), "", ""
    return first, configs


# ---- building the model ----------------------------------------------------------------------------------------


def torch_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def trains_lm(cfg):
    return cfg.stage == "instruct" or cfg.align_lora


def trains_lora(cfg):
    return trains_lm(cfg) and not cfg.full_lm


def load_lm(cfg, ref, d, out_dir):
    """The base LM: an HF folder or hub id; or, for a model.py preset name, random weights saved once to
    out_dir/random_{preset} so that checkpoints can name them."""
    if ref in MODEL_PRESETS and not Path(ref).exists():
        folder = Path(out_dir) / f"random_{ref}"
        if not (folder / "config.json").is_file():
            torch.manual_seed(cfg.seed)
            model = Phi(PhiConfig.from_preset(ref))
            if d.master:
                save_checkpoint(out_dir, model.save_pretrained, name=folder.name)
            d.barrier()
        d.log(f"language model: a '{ref}' Phi with random weights (saved in {folder})"
              + ("" if cfg.full_lm else "; only LoRA adapters train on it"))
        ref = str(folder)
    quantize = (cfg.quantize or None) if cfg.stage == "instruct" else None
    return Phi.from_pretrained(ref, dtype=torch_dtype(cfg.lm_dtype, d.device), device=d.device,
                               quantize=quantizer(quantize)), portable_ref(ref)


def build_model(cfg, d, start=None, resuming=False):
    """The MultimodalLM of a stage: a new one from cfg, or that of the checkpoint `start` (--init, or the checkpoint
    being resumed): its LM, tower, projector and adapter. --lm and --vision replace an --init checkpoint's, never those
    of a run being resumed. Everything but the projector and LoRA is frozen."""
    mm = read_mm_config(start) if start is not None else {}
    lm_ref = (not resuming and cfg.lm) or (resolve_ref(start, mm["lm"]) if mm else "")
    vision_ref = (not resuming and cfg.vision) or (resolve_ref(start, mm["vision"]) if mm else "")
    if not lm_ref:
        raise ValueError("no language model: pass --lm=FOLDER (or --init=CHECKPOINT)")
    if not vision_ref:
        raise ValueError("no vision tower: pass --vision=FOLDER (or --init=CHECKPOINT)")
    lm, lm_ref = load_lm(cfg, lm_ref, d, cfg.out_dir)
    if cfg.features:
        vision, (_, vision_config, processor) = None, tower_identity(vision_ref)
    else:
        vision, _ = load_vision(vision_ref, dtype=torch_dtype(cfg.lm_dtype, d.device), device=d.device, seed=cfg.seed)
        vision_config, processor = vision.config, vision.processor
        vision.requires_grad_(False).eval()
    if start is not None and (Path(start) / "projector.safetensors").is_file():
        projector = load_projector(Path(start) / "projector.safetensors")
    else:
        torch.manual_seed(cfg.seed + 7)
        projector = build_projector(mm.get("projector", cfg.projector), vision_config.hidden_size, lm.config.hidden_size)
    # a tower trained here (random, train_clip.py's, one saved inside a checkpoint) goes into the checkpoint; a
    # pretrained one (CLIP-L) is named
    random_tower = vision_ref in CLIP_PRESETS and not Path(vision_ref).exists()
    inside_start = start is not None and Path(vision_ref).resolve().is_relative_to(Path(start).resolve())
    from_clip_stage = (Path(vision_ref).parent / "contrastive.safetensors").is_file()
    model = MultimodalLM(lm, projector.to(d.device).train(), vision, feature_layer=mm.get("feature_layer", cfg.feature_layer),
                         pad_to_square=mm.get("pad_to_square", cfg.pad_to_square), lm_ref=lm_ref,
                         vision_ref="" if random_tower or inside_start or from_clip_stage else portable_ref(vision_ref),
                         vision_config=vision_config, processor=processor)
    lm.requires_grad_(cfg.full_lm and trains_lm(cfg))
    if cfg.full_lm and trains_lm(cfg):
        model.lm_ref = ""  # the trained LM is saved inside the checkpoint
    elif trains_lora(cfg):
        if start is not None and (Path(start) / "adapter_config.json").is_file():
            load_adapter(lm, start, quantize=cfg.quantize or None)
        else:
            torch.manual_seed(cfg.seed + 11)
            apply_lora(lm, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                       targets=tuple(t for t in cfg.lora_targets.split(",") if t), quantize=cfg.quantize or None)
    lm.config.gradient_checkpointing = cfg.gradient_checkpointing
    lm.to(d.device).train()
    return model


def optimizer_groups(model, cfg):
    """Projector and LoRA at lr; no weight decay on biases; the projector's groups wait freeze_image_iters."""
    decay = [p for p in model.projector.parameters() if p.dim() >= 2]
    other = [p for p in model.projector.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "image": True},
              {"params": other, "weight_decay": 0.0, "image": True}]
    if trains_lora(cfg):
        groups.append({"params": lora_parameters(model.lm), "weight_decay": cfg.weight_decay, "image": False})
    elif cfg.full_lm and trains_lm(cfg):
        groups += [{"params": [p for p in model.lm.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                    "image": False},
                   {"params": [p for p in model.lm.parameters() if p.dim() < 2], "weight_decay": 0.0, "image": False}]
    return [g for g in groups if g["params"]]


# ---- training ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def held_out_loss(model, val, micro, max_batches, images, d, dtype):
    """(mean loss per target token, number of targets) over the held-out records; process r takes every world-th."""
    was_training = model.training
    model.eval()
    mine = list(range(len(val)))[d.rank::d.world]
    chunks = [mine[k:k + micro] for k in range(0, len(mine), micro)]
    if max_batches:
        chunks = chunks[:max_batches]
    total = torch.zeros(2, dtype=torch.float64, device=d.device)
    for chunk in chunks:
        b = val.batch(chunk)
        with autocast(d.device, dtype):
            loss = model(b.ids, b.labels, b.image_index, images.get(b.images, d.device))
        total += torch.tensor([loss.item(), b.n_targets], dtype=torch.float64, device=d.device)
    all_reduce(total, d)
    model.train(was_training)
    if model.vision is not None:
        model.vision.eval()
    return total[0].item() / max(total[1].item(), 1.0), int(total[1].item())


def sample_answers(model, val, n, images, max_new_tokens, tokenizer):
    """Greedy answers to the first question of the first n held-out records (one per image first)."""
    if n == 0:
        return []
    was_training = model.training
    model.eval()
    records, seen = [], set()
    for r in val.records:
        if len(records) < n and r.get("image") not in seen:
            records.append(r)
            seen.add(r.get("image"))
    records += [r for r in val.records if r not in records][:n - len(records)]
    prompts = [([{"role": "user", "content": r["conversations"][0]["value"]}], r.get("image")) for r in records]
    try:
        answers = model.answer(prompts, images, max_new_tokens, tokenizer)
    finally:
        model.train(was_training)
        if model.vision is not None:
            model.vision.eval()
    return [{"id": str(r.get("id")), "question": r["conversations"][0]["value"], "answer": a,
             "reference": r["conversations"][1]["value"]} for r, a in zip(records, answers)]


def run_stage(cfg, d):
    """Train one stage as configured; returns its checkpoint folder."""
    log = d.log
    out_dir = Path(cfg.out_dir)
    checkpoint = run_checkpoint(cfg, out_dir)
    per_rank, micro, accum = batch_split(cfg.batch_size, cfg.micro_batch_size, d)
    init = find_mm_checkpoint(cfg.init) if cfg.init and checkpoint is None else None
    state = load_train_state(checkpoint) if checkpoint else {}
    if checkpoint is not None and state["iter"] >= (state.get("max_iters") or math.inf):
        log(f"{cfg.stage}: {checkpoint} is complete ({state['iter']} iterations)")
        return checkpoint

    records = load_checked(cfg.data, cfg, d)
    if cfg.val_data:
        train_records, val_records = records, load_checked(cfg.val_data, cfg, d)
    else:
        train_records, val_records = split_off(records, cfg.val_size, cfg.seed)
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(cfg, d, start=checkpoint or init, resuming=checkpoint is not None)
    cache = None
    if cfg.features:
        cache = FeatureCache(cfg.features, vision=model.vision_ref or cfg.vision, layer=model.feature_layer,
                             pad_to_square=model.pad_to_square)
    images = ImageSource(cfg.image_folder, model.processor, model.pad_to_square, cache, cfg.pixel_cache_mb,
                         cfg.workers)
    max_len = cfg.max_len or model.lm.config.max_position_embeddings
    if max_len > model.lm.config.max_position_embeddings:
        raise ValueError(f"--max_len={max_len} is longer than the LM's context of {model.lm.config.max_position_embeddings}")
    tokenizer = Tokenizer()
    data = LlavaData(train_records, tokenizer, model.image_tokens, max_len, cfg.seed, cfg.group_size)
    val = LlavaData(val_records, tokenizer, model.image_tokens, max_len, cfg.seed)
    max_iters = cfg.max_iters or math.ceil(cfg.epochs * len(data) / cfg.batch_size)
    dtype = autocast_dtype(cfg.dtype, d.device)

    groups = optimizer_groups(model, cfg)
    trainable = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer,
                               betas=(cfg.beta1, cfg.beta2))
    text_only = any(r.get("image") is None for r in train_records)
    ddp = wrap_ddp(model, d, broadcast_buffers=False, find_unused_parameters=text_only)
    it, totals = 0, {"truncated": 0}
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        it, totals["truncated"] = state["iter"], state["truncated"]
        restore_rng(state, d)
        log(f"resuming {cfg.stage} from {checkpoint} at iter {it}")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    n_trainable = sum(p.numel() for p in trainable)
    log(f"{cfg.stage}: {len(data):,} train / {len(val):,} held-out records, {max_iters} iters of {cfg.batch_size} "
        f"({d.world} processes x {accum} micro-steps x {micro}), {model.image_tokens} tokens per image, "
        f"{n_trainable / 1e6:.2f}M trainable parameters ({'projector' + (' + LoRA' if trains_lora(cfg) else ' + LM' if trains_lm(cfg) and cfg.full_lm else '')}), "
        f"{d.device}, {dtype or torch.float32}, out: {out_dir}", flush=True)

    def run_eval():
        stats = held_out_loss(model, val, micro, cfg.eval_batches, images, d, dtype)
        samples = sample_answers(model, val, cfg.samples, images, cfg.max_new_tokens, tokenizer) if d.master else None
        return stats, samples

    time_before = state.get("train_time_s", 0.0)

    def save(at):
        rngs = gather_objects(rng_state(), d)
        if d.master:
            train_state = {"iter": at, "max_iters": max_iters, "optimizer": optimizer.state_dict(), "rng": rngs,
                           "config": asdict(cfg), "truncated": totals["truncated"], "val_loss": state.get("val_loss"),
                           "train_time_s": time_before + time.time() - session_start, "world_size": d.world}
            save_checkpoint(out_dir, lambda folder: model.save(folder, cfg.stage, train_state))
        d.barrier()

    interval = {"tokens": 0, "images": 0, "truncated": 0}

    def step(it):
        mine = data.indices(it, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]
        batches = [data.batch(mine[k * micro:(k + 1) * micro]) for k in range(accum)]
        counts = all_reduce(torch.tensor([sum(b.n_targets for b in batches), sum(b.n_tokens for b in batches),
                                          sum(len(b.images) for b in batches), sum(b.truncated for b in batches)],
                                         dtype=torch.float64, device=d.device), d)
        n_targets = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for k, b in enumerate(batches):
            gradient_sync(ddp, k == accum - 1)
            with autocast(d.device, dtype):
                loss = ddp(b.ids, b.labels, b.image_index, images.get(b.images, d.device))
            # DDP averages gradients over processes: scaled by world / global targets, the result is the gradient of
            # the mean over every target token of the global batch
            (loss * (d.world / n_targets)).backward()
            loss_sum += loss.detach().double()
        all_reduce(loss_sum, d)
        if it < cfg.freeze_image_iters:
            # no step and no optimizer state yet: a random LM's first gradients ("say these words at all") would
            # collapse the image features, and would linger in Adam's second moments
            for group in optimizer.param_groups:
                if group.get("image"):
                    for p in group["params"]:
                        p.grad = None
        totals["truncated"] += int(counts[3].item())
        for key, value in zip(("tokens", "images", "truncated"), counts[1:].tolist()):
            interval[key] += value
        return loss_sum.item() / n_targets

    def report(it, row, evaluating, timing):
        seconds, iters = timing["seconds"], timing["iters"]
        row.update(stage=cfg.stage, val_loss=None, tokens_per_s=interval["tokens"] / seconds,
                   images_per_s=interval["images"] / seconds, ms_per_iter=1000 * seconds / iters,
                   truncated=int(interval["truncated"]), truncated_total=totals["truncated"])
        if evaluating:
            (row["val_loss"], _), row["samples"] = run_eval()
            state["val_loss"] = row["val_loss"]
        log(f"{cfg.stage} iter {timing['progress']}: loss {row['train_loss']:.4f}"
            + (f", held-out {row['val_loss']:.4f}" if evaluating else "")
            + f", lr {row['lr']:.2e}, {row['tokens_per_s']:,.0f} tokens/s, {row['images_per_s']:.1f} images/s, "
            f"{row['ms_per_iter']:.0f} ms/iter" + (f", {totals['truncated']} truncated" if totals["truncated"] else ""),
            flush=True)
        if evaluating and d.master:
            for s in row["samples"] or []:
                log(f"    [{s['id']}] {s['question']!r} -> {s['answer']!r} (reference {s['reference']!r})")
        if d.master:
            logbook.write(row)
            if evaluating:
                plot_losses(logbook.rows(), out_dir / "loss.png", f"{cfg.stage} on {Path(cfg.data).name}")
        interval.update(tokens=0, images=0, truncated=0)

    if checkpoint is None:
        (val_loss, _), samples = run_eval()
        state["val_loss"] = val_loss
        log(f"iter 0: held-out loss {val_loss:.4f}")
        if d.master:
            logbook.write({"iter": 0, "stage": cfg.stage, "train_loss": None, "val_loss": val_loss, "lr": 0.0,
                           "samples": samples})
    session_start = time.time()
    it, train_time = train_loop(cfg, it=it, max_iters=max_iters, optimizer=optimizer, parameters=lambda: trainable,
                                step=step, report=report, save=save, saved_at=it if checkpoint is not None else None,
                                time_before=time_before, checkpoint_name=str(out_dir / "ckpt"))
    log(f"{cfg.stage}: done, {it} iterations in {format_seconds(train_time)}; checkpoint {out_dir / 'ckpt'}", flush=True)
    return out_dir / "ckpt"


# ---- evaluation ------------------------------------------------------------------------------------------------


def normalize(answer):
    return answer.strip().lower().removesuffix(".").strip()


def evaluate(cfg, checkpoint, d):
    """Exact-match accuracy of greedy answers to the first question of every eval record, per answer_type. Writes
    eval.json beside the run and prints a markdown table."""
    if not cfg.eval_data:
        raise ValueError("--eval needs --eval_data (a LLaVA JSON of questions with reference answers)")
    start = time.time()
    records = load_checked(cfg.eval_data, cfg, d)
    if cfg.eval_max:
        records = records[:cfg.eval_max]
    model = MultimodalLM.load(checkpoint, device=d.device, dtype="bfloat16" if d.device.type == "cuda" else None).eval()
    if model.vision is None:
        raise ValueError(f"{checkpoint} has no vision tower to answer questions about images with")
    images = ImageSource(cfg.image_folder, model.processor, model.pad_to_square, None, cfg.pixel_cache_mb, cfg.workers)
    tokenizer = Tokenizer()
    order = sorted(range(len(records)), key=lambda i: (str(records[i].get("image")), i))[d.rank::d.world]
    results = []
    for k in range(0, len(order), cfg.eval_batch_size):
        chunk = [records[i] for i in order[k:k + cfg.eval_batch_size]]
        prompts = [([{"role": "user", "content": r["conversations"][0]["value"]}], r.get("image")) for r in chunk]
        answers = model.answer(prompts, images, cfg.max_new_tokens, tokenizer)
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
    if set(counts) != {"all"}:
        lines += [f"| {kind} | {r['n']:,} | {r['correct']:,} | {100 * r['correct'] / r['n']:.2f}% |"
                  for kind, r in sorted(counts.items())]
    lines.append(f"| **all** | {n:,} | {correct:,} | **{100 * report['accuracy']:.2f}%** |")
    print(f"\nexact-match accuracy of {checkpoint} on {cfg.eval_data} ({format_seconds(report['seconds'])}):\n")
    print("\n".join(lines) + "\n", flush=True)
    print(f"wrote {out}")
    return report


# ---- main -----------------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(help_text(MMConfig, PRESETS, __doc__))
        raise SystemExit(0)
    return_freed_memory()  # a QLoRA step's dequantized weights go back to the system (peak memory)
    with reported_errors("train_mm.py"):
        first, configs = stage_configs(argv)
        d = setup_distributed(first.device)
    try:
        with reported_errors("train_mm.py"):
            run(first, configs, d)
    finally:
        close_distributed(d)


def run(first, configs, d):
    start = time.time()
    if Path(first.image_folder).resolve() == (EASYVQA / "images").resolve():
        prepare_once(d, EASYVQA / "train_demo.json", REPO / "data" / "easyvqa" / "prepare.py", what="easy-vqa")
    if first.eval:
        evaluate(first, find_mm_checkpoint(first.init or first.out_dir), d)
        return
    checkpoint = None
    for cfg in configs:
        if len(configs) > 1 and cfg.resume:  # resume the stage that was interrupted; start the next one
            cfg.resume = find_checkpoint(cfg.out_dir) is not None
        checkpoint = run_stage(cfg, d)
    if first.eval_data:
        evaluate(replace(configs[-1], out_dir=first.out_dir), checkpoint, d)
    d.log(f"total wall time {format_seconds(time.time() - start)}")


if __name__ == "__main__":
    main()
