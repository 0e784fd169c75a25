"""
Contrastive pretraining of a CLIP vision tower from random weights, for when no pretrained CLIP can be had (the
offline demo): the tower learns from image-caption pairs with CLIP's objective against a bag-of-words caption
encoder. Its checkpoint's vision/ is a CLIP vision folder for train_mm.py --vision=... (which keeps it frozen, as
LLaVA keeps CLIP's).

    python train_clip.py                                  # the demo: easy-vqa captions -> out/mm-demo/clip/ckpt/vision
    torchrun --nproc_per_node=2 train_clip.py --data=captions.json --image_folder=images --vision=clip-vit-base-patch16

Options are --key=value overrides of ClipConfig on top of a preset (--help lists them). The data is LLaVA JSON whose
first answer of each image record is its caption (easy-vqa's captions.json, LLaVA-Pretrain's 558K). Iteration i's
batch is a function of (seed, i): a run resumes exactly (--resume). The run folder gets log.jsonl, loss.png and ckpt/
(vision/, contrastive.safetensors with the caption encoder, train_state.pt).
"""

import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from clip_encoder import CLIP_PRESETS, CLIPVisionConfig
from common import (JsonlLog, LoopConfig, autocast, autocast_dtype, batch_split, close_distributed, format_seconds,
                    gather_objects, load_train_state, parse_config, plot_losses, prepare_once, reported_errors,
                    restore_rng, return_freed_memory, rng_state, run_checkpoint, save_checkpoint, seed_everything,
                    setup_distributed, train_loop, wrap_ddp)
from common import KILL_AT_ITER_ENV  # noqa: F401 (the resume tests set it)
from llava_data import ImageSource, LlavaData, load_checked, split_off
from lora import make_optimizer
from model import write_safetensors
from multimodal import load_vision
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
EASYVQA = REPO / "data" / "easyvqa" / "prepared"


@dataclass
class ClipConfig(LoopConfig):
    preset: str = "demo"  # a PRESETS entry that sets the defaults; options on the command line win
    data: str = ""  # LLaVA JSON of captioned images: each image record's first answer is its caption
    image_folder: str = ""  # image paths in the JSON are relative to this folder
    val_data: str = ""  # held-out captions; empty: whole images with about val_size records are split off --data
    val_size: int = 256  # records held out for the held-out loss when no val_data is given
    skip_bad: bool = False  # leave out bad records (listed) instead of stopping
    check_images: str = "open"  # how the data check looks at images: open | decode | exists | none
    vision: str = "demo"  # a clip_encoder preset (random weights) or a CLIP folder to train further
    vision_config: str = ""  # overrides of a random tower's preset, e.g. "image_size=64,patch_size=8"
    feature_layer: int = -1  # the layer whose patch features (their mean) learn: the one the projector will read
    pad_to_square: bool = False  # pad images to a square (LLaVA-1.5) before resizing, instead of a center crop
    out_dir: str = ""  # empty: out/mm-{preset}/clip
    batch_size: int = 128  # image-caption pairs per optimizer step over all processes (each contrasts its own)
    epochs: float = 1.0  # passes over the data when max_iters is 0
    optimizer: str = "adamw"  # adamw | adamw8bit | paged_adamw8bit
    dtype: str = "auto"  # autocast: auto (bfloat16 on a GPU that has it) | float32 | bfloat16
    eval_batch_size: int = 256  # questions answered per batch in evaluation
    pixel_cache_mb: int = 1024  # keep preprocessed images in memory up to this size
    workers: int = 8  # threads that load images

    def __post_init__(self):
        super().__post_init__()
        self.check_at_least(1, "val_size", "batch_size", "eval_batch_size")
        self.check_at_least(0, "pixel_cache_mb", "workers")
        if not self.data:
            raise ValueError("--data is required (a LLaVA JSON of captioned images)")
        self.out_dir = self.out_dir or f"out/mm-{self.preset}/clip"


PRESETS = {
    # the offline demo: a random ViT (easy-vqa's 64x64 images at 32x32, an 8x8 grid of patches, 128 wide)
    "demo": dict(data=str(EASYVQA / "captions.json"), image_folder=str(EASYVQA / "images"), vision="demo",
                 feature_layer=-1, val_size=200, batch_size=128, max_iters=400, lr=1e-3, min_lr=1e-4, warmup_iters=20,
                 eval_interval=100, log_interval=20, dtype="float32"),
    # tests: a tiny tower, a few iterations
    "tiny": dict(vision="tiny", feature_layer=-1, val_size=4, batch_size=4, max_iters=4, lr=3e-3, min_lr=3e-4,
                 warmup_iters=1, eval_interval=2, log_interval=1, eval_batch_size=8, workers=2),
}


class CaptionEncoder(nn.Module):
    """The text side: the mean of a caption's token embeddings, projected. A bag of words says everything in a
    caption like "A red circle."; CLIP itself has a text transformer here."""

    def __init__(self, vocab_size, dim):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids, mask):
        mask = mask.unsqueeze(-1).to(self.proj.weight.dtype)
        return self.proj((self.embedding(ids) * mask).sum(1) / mask.sum(1).clamp(min=1))


class ContrastiveTower(nn.Module):
    """CLIP's objective: the embeddings of an image and its caption meet, those of other pairs in the batch part
    (pairs with the same caption count as matches). The image embedding is the mean of the patch features the
    projector will read (feature_layer), so those are what learns."""

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
def clip_eval(model, pairs, images, tokenizer, batch_size, device, dtype):
    """(held-out loss, caption accuracy): the mean contrastive loss over batches of the held-out pairs, and how often
    the nearest of all the held-out captions is an image's own."""
    model.eval()
    texts = list(dict.fromkeys(c for _, c in pairs))
    ids, mask, _ = caption_batch(texts, tokenizer, device)
    with autocast(device, dtype):
        text = model.caption_embeddings(ids, mask)
    losses, correct = [], 0
    for k in range(0, len(pairs), batch_size):
        chunk = pairs[k:k + batch_size]
        pixels = images.get([p for p, _ in chunk], device)["pixels"]
        with autocast(device, dtype):
            loss, image = model(pixels, *caption_batch([c for _, c in chunk], tokenizer, device))
        nearest = (image @ text.T).argmax(1).tolist()
        correct += sum(texts[n] == c for n, (_, c) in zip(nearest, chunk))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses), correct / len(pairs)


def train(cfg, d):
    """Train as configured; returns the checkpoint folder, whose vision/ is a CLIP vision folder."""
    log, out_dir = d.log, Path(cfg.out_dir)
    checkpoint = run_checkpoint(cfg, out_dir)
    per_rank, _, _ = batch_split(cfg.batch_size, 0, d, "pairs")
    state = load_train_state(checkpoint) if checkpoint else {}
    if checkpoint is not None and state["iter"] >= state["max_iters"]:
        log(f"clip: {checkpoint} is complete ({state['iter']} iterations)")
        return checkpoint

    train_records, val_records = split_off(load_checked(cfg.data, cfg, d), cfg.val_size, cfg.seed)
    if cfg.val_data:
        train_records, val_records = train_records + val_records, load_checked(cfg.val_data, cfg, d)
    pairs, val_pairs = image_captions(train_records), image_captions(val_records)
    seed_everything(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer()
    vision, _ = load_vision(str(checkpoint / "vision") if checkpoint else cfg.vision, dtype=torch.float32,
                            device=d.device, seed=cfg.seed, overrides=tower_overrides(cfg.vision_config))
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
    dtype = autocast_dtype(cfg.dtype, d.device)
    optimizer = make_optimizer(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer,
                               betas=(cfg.beta1, cfg.beta2))
    ddp = wrap_ddp(model, d)
    it = 0
    if checkpoint is not None:
        optimizer.load_state_dict(state["optimizer"])
        it = state["iter"]
        restore_rng(state, d)
        log(f"resuming clip from {checkpoint} at iter {it}")
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    log(f"clip: {len(pairs):,} train / {len(val_pairs):,} held-out image-caption pairs, {max_iters} iters of "
        f"{cfg.batch_size} ({d.world} processes), {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{d.device}, {dtype or torch.float32}, out: {out_dir}", flush=True)
    time_before, session_start = state.get("train_time_s", 0.0), time.time()

    def evaluate_and_log(row):
        if d.master:
            row["val_loss"], row["caption_accuracy"] = clip_eval(model, val_pairs, images, tokenizer,
                                                                 cfg.eval_batch_size, d.device, dtype)
            log(f"clip iter {row['iter']}/{max_iters}: held-out loss {row['val_loss']:.4f}, held-out images whose "
                f"nearest caption is their own {100 * row['caption_accuracy']:.1f}%", flush=True)
            logbook.write(row)
            plot_losses(logbook.rows(), out_dir / "loss.png", f"clip on {Path(cfg.data).name}")

    def save(at):
        rngs = gather_objects(rng_state(), d)
        if d.master:
            train_state = {"iter": at, "max_iters": max_iters, "optimizer": optimizer.state_dict(), "rng": rngs,
                           "config": asdict(cfg), "train_time_s": time_before + time.time() - session_start,
                           "world_size": d.world}

            def write(folder):
                vision.save_pretrained(folder / "vision")
                text = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
                write_safetensors(text, folder / "contrastive.safetensors")
                torch.save(train_state, folder / "train_state.pt")
            save_checkpoint(out_dir, write)
        d.barrier()

    def step(it):
        chunk = [pairs[i] for i in order.indices(it, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]]
        pixels = images.get([p for p, _ in chunk], d.device)["pixels"]
        with autocast(d.device, dtype):
            loss, _ = ddp(pixels, *caption_batch([c for _, c in chunk], tokenizer, d.device))
        loss.backward()  # each process's own batch is contrasted; DDP averages the gradients
        return loss.item()

    def report(it, row, evaluating, timing):
        row.update(stage="clip", ms_per_iter=1000 * timing["seconds"] / timing["iters"])
        log(f"clip iter {timing['progress']}: loss {row['train_loss']:.4f}, lr {row['lr']:.2e}", flush=True)
        if evaluating:
            evaluate_and_log(row)
        elif d.master:
            logbook.write(row)

    if checkpoint is None:
        evaluate_and_log({"iter": 0, "stage": "clip", "train_loss": None, "lr": 0.0})
    it, train_time = train_loop(cfg, it=it, max_iters=max_iters, optimizer=optimizer, parameters=model.parameters,
                                step=step, report=report, save=save, saved_at=it if checkpoint is not None else None,
                                time_before=time_before, checkpoint_name=str(out_dir / "ckpt"))
    log(f"clip: done, {it} iterations in {format_seconds(train_time)}; checkpoint {out_dir / 'ckpt'}", flush=True)
    return out_dir / "ckpt"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return_freed_memory()
    with reported_errors("train_clip.py"):
        cfg = parse_config(ClipConfig, argv, PRESETS, doc=__doc__)
        if cfg.vision not in CLIP_PRESETS and not Path(cfg.vision).is_dir():
            raise FileNotFoundError(f"--vision={cfg.vision} is neither a clip_encoder preset "
                                    f"({', '.join(CLIP_PRESETS)}) nor a CLIP folder")
        tower_overrides(cfg.vision_config)
        d = setup_distributed(cfg.device)
    try:
        with reported_errors("train_clip.py"):
            if Path(cfg.image_folder).resolve() == (EASYVQA / "images").resolve():
                prepare_once(d, EASYVQA / "meta.json", REPO / "data" / "easyvqa" / "prepare.py", what="easy-vqa")
            train(cfg, d)
    finally:
        close_distributed(d)


if __name__ == "__main__":
    main()
