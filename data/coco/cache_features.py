"""
Cache the CLIP features of an image folder (COCO train2017 for LLaVA, or any folder of images) so that
projector training never runs the vision tower.

    python data/coco/cache_features.py --images=DIR --vision=PATH --out=DIR [--layer=-2 --batch_size=32 --pad_to_square]
    torchrun --nproc_per_node=8 data/coco/cache_features.py --images=... --vision=... --out=...

Writes fp16 safetensors shards keyed by the image path relative to --images, and index.json (path -> shard, and
a `meta` block naming the tower, layer and preprocessing; clip_encoder.FeatureCache refuses a cache whose meta
does not match). Under torchrun each rank takes every world_size-th image. Shards are written atomically, so a
crashed run resumes where it stopped when started again with the same arguments.
"""

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clip_encoder import CLIPVision, cache_meta, load_image, meta_mismatches, preprocess  # noqa: E402
from common import fail, parse_config, resolve_device  # noqa: E402
from model import atomic_write, write_safetensors  # noqa: E402

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class CacheConfig:
    images: str = ""           # folder of images (searched recursively)
    vision: str = ""           # CLIP checkpoint folder or hub id
    out: str = ""              # cache folder
    layer: int = -2            # hidden_states index (LLaVA: -2)
    drop_cls: bool = True  # leave out the class token (LLaVA reads only the patches)
    pad_to_square: bool = False  # pad images to a square (LLaVA-1.5) before resizing, instead of a center crop
    batch_size: int = 32  # images per forward of the tower
    shard_size: int = 512      # images per shard file
    workers: int = 2           # background image-loading processes (0: load in the main process)
    device: str = "auto"       # auto: cuda when available
    dtype: str = "auto"        # tower dtype; auto: float16 on cuda, float32 on cpu (features are stored fp16)


def parse_args(argv):
    """--key=value overrides of CacheConfig; a bare --flag sets a bool to true."""
    try:
        config = parse_config(CacheConfig, argv, doc=__doc__)
        for key in ("images", "vision", "out"):
            if not getattr(config, key):
                raise ValueError(f"--{key}=... is required")
        if config.batch_size < 1 or config.shard_size < 1 or config.workers < 0:
            raise ValueError("batch_size and shard_size must be >= 1, workers >= 0")
    except ValueError as err:
        fail("cache_features.py", err)
    return config


def list_images(folder):
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class ImageFolder(torch.utils.data.Dataset):
    """(relative path, pixel values or None, error message or None) per image; runs in loader workers."""

    def __init__(self, root, relpaths, processor, pad_to_square):
        self.root, self.relpaths, self.processor, self.pad_to_square = Path(root), relpaths, processor, pad_to_square

    def __len__(self):
        return len(self.relpaths)

    def __getitem__(self, i):
        rel = self.relpaths[i]
        try:
            return rel, preprocess([load_image(self.root / rel)], self.processor, self.pad_to_square)[0], None
        except (ValueError, OSError) as err:
            return rel, None, str(err)


def shard_files(out):
    return sorted(Path(out).glob("features-rank*.safetensors"))


def finished_images(out, meta):
    """{relative path: shard name} of every complete shard in out; refuses shards made with another setting."""
    from safetensors import safe_open

    done = {}
    for file in shard_files(out):
        with safe_open(file, framework="pt", device="cpu") as f:
            cached = json.loads((f.metadata() or {}).get("meta", "{}"))
            bad = meta_mismatches(cached, meta)
            if bad:
                raise ValueError(f"{file} was made with another tower or setting (differs in {', '.join(bad)}); "
                                 f"use a new --out folder or delete {out}")
            done.update({k: file.name for k in f.keys()})
    return done


def write_shard(out, rank, features, meta):
    seqs = [int(f.stem.rsplit("-", 1)[1]) for f in Path(out).glob(f"features-rank{rank:03d}-*.safetensors")]
    name = f"features-rank{rank:03d}-{max(seqs, default=0) + 1:05d}.safetensors"
    write_safetensors(features, Path(out) / name, metadata={"meta": json.dumps(meta)})
    return name


def write_index(out, meta):
    """index.json from the shards on disk plus the failures every rank reported."""
    files = finished_images(out, meta)
    failed = {}
    for report in Path(out).glob("failed-rank*.json"):
        failed.update(json.loads(report.read_text()))
    failed = {k: v for k, v in sorted(failed.items()) if k not in files}
    index = {"meta": meta, "files": dict(sorted(files.items())), "failed": failed}
    atomic_write(Path(out) / "index.json", json.dumps(index, indent=1))
    return index


def cache_features(config, *, rank=0, world_size=1, vision=None, log=print):
    """Cache this rank's share of the images; returns counts. `vision` may be passed already loaded."""
    device = str(resolve_device(config.device, int(os.environ.get("LOCAL_RANK", rank))))
    dtype = config.dtype if config.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    if vision is None:
        vision = CLIPVision.from_pretrained(config.vision, dtype=dtype, device=device)
    vision.source = config.vision
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(vision, config.layer, config.drop_cls, config.pad_to_square)
    for stale in out.glob(f"features-rank{rank:03d}-*.safetensors.tmp"):
        stale.unlink()  # a shard that was being written when a previous run died
    done = finished_images(out, meta)
    mine = list_images(config.images)[rank::world_size]
    todo = [p for p in mine if p not in done]
    log(f"rank {rank}: {len(mine)} images, {len(mine) - len(todo)} already cached, {len(todo)} to do")

    loader = torch.utils.data.DataLoader(
        ImageFolder(config.images, todo, vision.processor, config.pad_to_square), batch_size=config.batch_size,
        num_workers=config.workers, collate_fn=list, pin_memory=device.startswith("cuda"))
    pending, failed, written, t0, last_log = {}, {}, 0, time.time(), 0.0
    for batch in loader:
        ok = [(rel, pixels) for rel, pixels, err in batch if err is None]
        failed.update({rel: err for rel, _, err in batch if err is not None})
        if ok:
            pixels = torch.stack([p for _, p in ok]).to(device, non_blocking=True)
            with torch.inference_mode():
                feats = vision.features(pixels, layer=config.layer, drop_cls=config.drop_cls).to(torch.float16).cpu()
            pending.update({rel: f.clone() for (rel, _), f in zip(ok, feats)})  # own storage per tensor
        while len(pending) >= config.shard_size:
            full = dict(list(pending.items())[:config.shard_size])
            write_shard(out, rank, full, meta)
            written, pending = written + len(full), {k: v for k, v in pending.items() if k not in full}
        n = written + len(pending) + len(failed)
        if time.time() - last_log > 10 or n == len(todo):
            rate = n / max(time.time() - t0, 1e-9)
            log(f"rank {rank}: {n}/{len(todo)} images, {rate:.1f} img/s, eta {(len(todo) - n) / max(rate, 1e-9):.0f} s")
            last_log = time.time()
    if pending:
        write_shard(out, rank, pending, meta)
        written += len(pending)
    report = out / f"failed-rank{rank:03d}.json"
    report.with_suffix(".tmp").write_text(json.dumps(failed, indent=1))
    os.replace(report.with_suffix(".tmp"), report)
    for rel, err in failed.items():
        log(f"rank {rank}: skipped {rel}: {err}")
    return {"cached": written, "skipped": len(mine) - len(todo), "failed": len(failed), "meta": meta}


def main(argv=None):
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except (ValueError, FileNotFoundError) as err:
        fail("cache_features.py", err)


def run(config):
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    distributed = world_size > 1
    if distributed:
        import torch.distributed as dist
        cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        stats = cache_features(config, rank=rank, world_size=world_size)
        if distributed:
            dist.barrier()
        if rank == 0:
            index = write_index(config.out, stats["meta"])
            print(f"wrote {Path(config.out) / 'index.json'}: {len(index['files'])} images cached, "
                  f"{len(index['failed'])} failed; settings {json.dumps(asdict(config))}")
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
