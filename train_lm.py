"""
Pretraining (or continued training) of the Phi language model on token data made by data/text/prepare.py.

    python train_lm.py                                    # offline demo on a CPU (prepares the stdlib corpus first)
    python train_lm.py --preset=small --data_dir=data/text/tinystories
    torchrun --nproc_per_node=8 train_lm.py --preset=phi-2 --data_dir=data/text/slimpajama
    python train_lm.py --out_dir=out/lm-demo --eval_only --compare=microsoft/phi-2

Options are --key=value overrides of TrainConfig on top of a preset (a bare --flag sets a bool to true). The
training batch of iteration i is a function of (seed, i) alone and every rank takes its slice of that global batch,
so a run resumes exactly and N processes train like one. The run folder gets log.jsonl, loss.png, report.md and
ckpt/ (Hugging Face layout + train_state.pt). The helpers before `train` are shared with train_mm.py.
"""

import contextlib
import functools
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import PRESETS as MODEL_PRESETS
from model import Phi, PhiConfig, resolve_checkpoint
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = "data/text/stdlib"
KILL_AT_ITER_ENV = "TRAIN_LM_SIGKILL_AT_ITER"  # for the resume test: SIGKILL this process after that iteration


@dataclass
class TrainConfig:
    preset: str = "demo"  # a TRAIN_PRESETS entry that sets the defaults; options on the command line win
    model: str = "demo"  # a model.py preset to train from scratch, or an HF folder to continue training
    data_dir: str = DEFAULT_DATA_DIR  # train.bin, val.bin, meta.json; the default corpus is prepared when missing
    out_dir: str = ""  # empty: out/lm-{preset}
    seq_len: int = 128
    batch_size: int = 16  # global batch: sequences per optimizer step over all processes and micro-steps
    micro_batch_size: int = 0  # sequences per forward in one process; 0: batch_size // processes (no accumulation)
    max_iters: int = 400
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 20
    lr_decay_iters: int = 0  # end of the cosine; 0: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0: off
    eval_interval: int = 100
    eval_iters: int = 8  # the val set is eval_iters * batch_size fixed windows of seq_len tokens
    log_interval: int = 10
    ckpt_interval: int = 0  # 0: at every eval; there is always one at the end
    max_time_s: float = 0.0  # stop (evaluate, checkpoint, report) once the command has run this long; 0: no limit
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 autocast on a GPU that has it, else float32) | float32 | bfloat16
    compile: bool = False
    fsdp: bool = False  # shard parameters, gradients and optimizer state (torch.distributed.fsdp.fully_shard)
    gradient_checkpointing: bool = False
    peak_flops: float = 0.0  # per device, for MFU; 0: a guess from the device name
    resume: bool = False
    eval_only: bool = False  # evaluate the checkpoint in out_dir and write report.md, no training
    compare: str = ""  # a reference model (HF folder or hub id) evaluated on the same val windows

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, not {getattr(self, name)}")
        for name in ("micro_batch_size", "max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval",
                     "weight_decay", "grad_clip", "min_lr", "peak_flops", "max_time_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, not {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, not {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), not {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval_only exclude each other")
        self.out_dir = self.out_dir or f"out/lm-{self.preset}"


TRAIN_PRESETS = {
    # this CPU: the 4-layer demo model, small batches (the 51,200-way output layer dominates the cost); about
    # 0.5 s per iteration on 2 idle cores; --max_time_s keeps the whole command under 10 minutes on a busy machine
    "demo": dict(model="demo", seq_len=64, batch_size=8, max_iters=600, lr=3e-3, min_lr=3e-4, warmup_iters=20,
                 eval_interval=50, eval_iters=8, log_interval=10, ckpt_interval=200, max_time_s=480),
    # tests: a 2-layer model, seconds
    "tiny": dict(model="tiny", seq_len=32, batch_size=4, max_iters=8, lr=3e-3, min_lr=3e-4, warmup_iters=2,
                 eval_interval=4, eval_iters=2, log_interval=1),
    # one GPU, GPT-2-small size
    "small": dict(model="small", seq_len=1024, batch_size=256, micro_batch_size=16, max_iters=20000, lr=6e-4,
                  min_lr=6e-5, warmup_iters=1000, eval_interval=500, eval_iters=4, log_interval=10, compile=True),
    # a node of GPUs: Phi-2 from random weights, sharded
    "phi-2": dict(model="phi-2", seq_len=2048, batch_size=512, micro_batch_size=4, max_iters=100000, lr=2e-4,
                  min_lr=2e-5, warmup_iters=2000, eval_interval=1000, eval_iters=2, log_interval=10, fsdp=True,
                  gradient_checkpointing=True, compile=True),
}


# ---- command line ------------------------------------------------------------------------------------------


def parse_value(name, kind, text):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name}={text}: expected true or false")
    if kind is int:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not value.is_integer():
            raise ValueError(f"--{name}={text}: expected an integer")
        return int(value)
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--{name}={text}: expected a number") from None
    return text


def parse_config(cls, argv, presets=None):
    """A `cls` dataclass from `--key=value` arguments (a bare `--flag` sets a bool). With presets, `--preset=name`
    (or the field's default) picks the defaults first. Unknown keys and bad values raise ValueError."""
    given = parse_options(cls, argv)
    values = {}
    if presets is not None:
        name = given.get("preset", next(f.default for f in fields(cls) if f.name == "preset"))
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        values.update(presets[name])
    values.update(given)
    return cls(**values)


def parse_options(cls, argv):
    """{field: typed value} of the `--key=value` arguments for the `cls` dataclass, as the command line gave them."""
    types = {f.name: f.type for f in fields(cls)}
    given = {}
    for arg in argv:
        key, has_value, text = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not key:
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value")
        if key not in types:
            raise ValueError(f"unknown option --{key}; valid options are: {', '.join('--' + k for k in types)}")
        if not has_value and types[key] is not bool:
            raise ValueError(f"--{key} needs a value: --{key}=...")
        given[key] = parse_value(key, types[key], text if has_value else "true")
    return given


# ---- processes, devices, precision ---------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed(device="auto"):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPU); pick this rank's device."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device in ("auto", "cuda"):
        device = f"cuda:{local}" if torch.cuda.is_available() or device == "cuda" else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device={device} but no CUDA GPU is available")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local, world, device)


def autocast_dtype(dtype, device):
    """The autocast dtype for --dtype, or None for plain float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if dtype == "bfloat16" else None


def peak_flops_guess(device):
    """Dense bf16 peak of one device, for MFU (a nominal 100 GFLOP/s per core on a CPU)."""
    if device.type != "cuda":
        return 100e9 * (os.cpu_count() or 1)
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
                       ("A10", 125e12), ("4090", 165e12), ("3090", 71e12), ("V100", 125e12)):
        if key in name:
            return flops
    return 312e12


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_objects(obj, d):
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


# ---- optimization -----------------------------------------------------------------------------------------------


def configure_optimizer(model, lr, weight_decay, betas):
    """Fused AdamW with weight decay on weight matrices only: not on biases, LayerNorms or embedding tables."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (decay if p.dim() >= 2 and not isinstance(module, nn.Embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


def cosine_lr(it, lr, min_lr, warmup_iters, decay_iters):
    """Linear warmup to lr, then a cosine down to min_lr at decay_iters, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def gradient_sync(model, sync):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync


# ---- checkpoints, logs, plots, reports ------------------------------------------------------------------------


def save_checkpoint(out_dir, write, name="ckpt"):
    """write(folder) fills a temporary folder that is then swapped in, so that out_dir/name (or, after a crash
    in the middle of the swap, out_dir/name.old) is always a whole checkpoint."""
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / name, out_dir / f"{name}.tmp", out_dir / f"{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir, name="ckpt"):
    """The whole checkpoint folder in out_dir, or None."""
    for folder in (Path(out_dir) / name, Path(out_dir) / f"{name}.old"):
        if (folder / "train_state.pt").is_file():
            return folder
    return None


def atomic_write(path, data):
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


class JsonlLog:
    """log.jsonl, one JSON object per line. A resumed run drops the lines after its checkpoint's iteration."""

    def __init__(self, path, keep_until_iter=None):
        self.path = Path(path)
        kept = [r for r in self.rows() if keep_until_iter is not None and r["iter"] <= keep_until_iter]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def rows(self):
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows

    def write(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def nice_ticks(lo, hi, n=6):
    """Round tick values covering [lo, hi], about n of them."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [round(i * step, 10) for i in range(first, last + 1)]


def plot_losses(rows, path, title="", series=(("train_loss", "train", (31, 119, 180)),
                                             ("val_loss", "val", (255, 127, 14)))):
    """A line chart of the losses in log rows (PIL only): axes, ticks, grid, labels and a legend."""
    from PIL import Image, ImageDraw, ImageFont

    lines = [(label, color, [(r["iter"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])])
             for key, label, color in series]
    lines = [line for line in lines if line[2]]
    if not lines:
        return
    try:
        font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        font = small = ImageFont.load_default()
    width, height, left, right, top, bottom = 900, 540, 80, 30, 50, 60
    xs = [x for _, _, pts in lines for x, _ in pts]
    ys = [y for _, _, pts in lines for _, y in pts]
    xt, yt = nice_ticks(min(xs), max(xs), 8), nice_ticks(min(ys), max(ys), 6)
    (x0, x1), (y0, y1) = (xt[0], xt[-1]), (yt[0], yt[-1])

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for x in xt:
        a, b = px(x, y0), px(x, y1)
        draw.line([a, b], fill=(230, 230, 230))
        draw.line([a, (a[0], a[1] + 5)], fill="black")
        draw.text((a[0], a[1] + 8), f"{x:g}", fill="black", font=small, anchor="mt")
    for y in yt:
        a, b = px(x0, y), px(x1, y)
        draw.line([a, b], fill=(230, 230, 230))
        draw.line([(a[0] - 5, a[1]), a], fill="black")
        draw.text((a[0] - 8, a[1]), f"{y:g}", fill="black", font=small, anchor="rm")
    draw.line([px(x0, y1), px(x0, y0), px(x1, y0)], fill="black", width=2)
    for label, color, pts in lines:
        xy = [px(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2, joint="curve")
        if len(xy) < 60:
            for cx, cy in xy:
                draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=color)
    for i, (label, color, _) in enumerate(lines):
        lx, ly = width - right - 110, top + 10 + 22 * i
        draw.line([(lx, ly + 8), (lx + 24, ly + 8)], fill=color, width=3)
        draw.text((lx + 32, ly + 8), label, fill="black", font=small, anchor="lm")
    draw.text((left + (width - left - right) / 2, height - 18), "iteration", fill="black", font=font, anchor="mm")
    draw.text((width / 2, 24), title, fill="black", font=font, anchor="mm")
    ylabel = Image.new("RGB", (60, 24), "white")
    ImageDraw.Draw(ylabel).text((30, 12), "loss", fill="black", font=font, anchor="mm")
    ylabel = ylabel.rotate(90, expand=True)
    img.paste(ylabel, (12, int(top + (height - top - bottom) / 2 - ylabel.height / 2)))
    tmp = Path(f"{path}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def write_report(path, title, rows, notes=()):
    """A markdown report: a two-column table of (name, value) rows, then notes."""
    text = [f"# {title}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""] + list(notes)
    atomic_write(path, "\n".join(text).rstrip() + "\n")


# ---- data ----------------------------------------------------------------------------------------------------------


@functools.cache
def load_text_prepare():
    """data/text/prepare.py as a module (it owns the corpus format and the tokenizer fingerprint)."""
    spec = importlib.util.spec_from_file_location("data_text_prepare", REPO / "data" / "text" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that its functions pickle for worker processes
    spec.loader.exec_module(module)
    return module


class TokenData:
    """train.bin / val.bin of prepare.py, checked against meta.json and read through np.memmap.
    The training batch of iteration i is drawn from a generator seeded by (seed, i) alone."""

    def __init__(self, data_dir, seq_len, vocab_size):
        folder = Path(data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"data_dir {folder} does not exist; make it with data/text/prepare.py")
        missing = [n for n in ("train.bin", "val.bin", "meta.json") if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"data_dir {folder} has no {', '.join(missing)}; make it with data/text/prepare.py")
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{folder / 'meta.json'} is not valid JSON ({err})") from None
        ours = load_text_prepare().tokenizer_fingerprint(Tokenizer())
        if meta.get("tokenizer_fingerprint") != ours:
            raise ValueError(f"{folder} was made with another tokenizer (meta.json: tokenizer {meta.get('tokenizer')!r}, "
                             f"fingerprint {meta.get('tokenizer_fingerprint')!r}; ours: 'phi-2', {ours}); "
                             "prepare the data again with data/text/prepare.py")
        if meta.get("dtype", "uint16") != "uint16":
            raise ValueError(f"{folder}/meta.json says dtype {meta['dtype']!r}; train.bin/val.bin must be uint16")
        self.meta, self.seq_len = meta, seq_len
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            size = path.stat().st_size
            if size % 2 or size // 2 != meta.get(f"{split}_tokens"):
                raise ValueError(f"{path} holds {size / 2:g} uint16 tokens but meta.json says {meta.get(f'{split}_tokens')}: "
                                 "the file belongs to another preparation; prepare the data again")
            if size // 2 <= seq_len:
                raise ValueError(f"{path} has {size // 2} tokens, too few for --seq_len={seq_len}")
            setattr(self, split, np.memmap(path, dtype=np.uint16, mode="r"))
        if int(self.val.max()) >= vocab_size:
            raise ValueError(f"{folder}/val.bin has token id {int(self.val.max())}, outside the model's vocabulary "
                             f"of {vocab_size}: made with another tokenizer")

    def windows(self, tokens, offsets):
        xy = torch.from_numpy(np.stack([tokens[o:o + self.seq_len + 1] for o in offsets]).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]

    def train_offsets(self, it, seed, batch_size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + it)
        return torch.randint(len(self.train) - self.seq_len, (batch_size,), generator=generator).numpy()

    def val_offsets(self, n):
        return np.linspace(0, len(self.val) - self.seq_len - 1, n).astype(np.int64)


def to_device(tensors, device):
    if device.type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


@torch.no_grad()
def evaluate(model, data, offsets, micro, d, autocast=None):
    """Mean loss over the val windows at offsets; rank r takes every world-th window, so any world size agrees."""
    was_training = model.training
    model.eval()
    mine = offsets[d.rank::d.world]
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for i in range(0, len(mine), micro):
        x, y = to_device(data.windows(data.val, mine[i:i + micro]), d.device)
        with torch.autocast(d.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            _, loss = model(x, targets=y)
        total += loss.double() * len(x)
    if d.world > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return total.item() / len(offsets)


# ---- training -------------------------------------------------------------------------------------------------


def prepare_default_corpus(cfg, d):
    """The demo corpus (the Python standard library) is prepared on first use."""
    folder = Path(cfg.data_dir)
    if (folder / "meta.json").is_file() or Path(cfg.data_dir) != Path(DEFAULT_DATA_DIR):
        return
    if d.master:
        print(f"preparing the default corpus (this Python's standard library) into {folder}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / "data" / "text" / "prepare.py"), f"--out_dir={folder}"])
        if done.returncode:
            raise RuntimeError(f"preparing the default corpus into {folder} failed (see the message above)")
    d.barrier()


def model_config(cfg, checkpoint):
    """The PhiConfig to train: the checkpoint's when resuming, else the --model preset's or HF folder's."""
    if checkpoint is not None or cfg.model not in MODEL_PRESETS:
        folder = checkpoint or resolve_checkpoint(cfg.model, "microsoft/phi-2")
        config = PhiConfig.from_hf_json(json.loads((Path(folder) / "config.json").read_text()))
    else:
        config = PhiConfig.from_preset(cfg.model)
    if cfg.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq_len={cfg.seq_len} is longer than the model's context of "
                         f"{config.max_position_embeddings} tokens")
    config.gradient_checkpointing = cfg.gradient_checkpointing
    return config


def build_model(cfg, config, checkpoint):
    if checkpoint is not None or cfg.model not in MODEL_PRESETS:
        model = Phi.from_pretrained(checkpoint or cfg.model)
        model.config.gradient_checkpointing = config.gradient_checkpointing
    else:
        model = Phi(config)
    return model.train()


def shard_model(model, autocast):
    """FSDP (fully_shard) per block and at the root; parameters kept in float32, computed in bf16 when asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32) if autocast else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def model_state(model, fsdp):
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model, optimizer, fsdp):
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state, fsdp):
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_hf(config, state, folder):
    """Write a full state dict in the HF layout through a weightless Phi."""
    with torch.device("meta"):
        shell = Phi(config)
    shell.load_state_dict(state, assign=True)
    shell.save_pretrained(folder)


def train(cfg):
    """Train (or with cfg.eval_only, evaluate) as configured; returns the final val loss."""
    d = setup_distributed(cfg.device)
    try:
        return run(cfg, d)
    finally:
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def run(cfg, d):
    log = print if d.master else (lambda *a, **k: None)
    command_start = time.time()
    out_dir = Path(cfg.out_dir)

    # everything that can be wrong is checked before the first step
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch_size={cfg.batch_size} is not divisible by the {d.world} processes")
    per_rank = cfg.batch_size // d.world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"each process takes {per_rank} sequences per step, not a multiple of --micro_batch_size={micro}")
    accum = per_rank // micro
    checkpoint = find_checkpoint(out_dir) if cfg.resume or cfg.eval_only else None
    if (cfg.resume or cfg.eval_only) and checkpoint is None:
        raise FileNotFoundError(f"--{'resume' if cfg.resume else 'eval_only'}: no checkpoint in {out_dir} "
                                f"(expected {out_dir / 'ckpt' / 'train_state.pt'})")
    config = model_config(cfg, checkpoint)
    compare = resolve_checkpoint(cfg.compare, "microsoft/phi-2") if cfg.compare else None
    if compare is not None:
        ref_config = PhiConfig.from_hf_json(json.loads((compare / "config.json").read_text()))
        if cfg.seq_len > ref_config.max_position_embeddings:
            raise ValueError(f"--seq_len={cfg.seq_len} is longer than {cfg.compare}'s context of "
                             f"{ref_config.max_position_embeddings} tokens")
    prepare_default_corpus(cfg, d)
    data = TokenData(cfg.data_dir, cfg.seq_len, config.vocab_size)
    # mmap: the ranks of a node share one copy of the optimizer state in the page cache
    state = torch.load(checkpoint / "train_state.pt", map_location="cpu", mmap=True, weights_only=False) if checkpoint else {}
    val_offsets = data.val_offsets(cfg.eval_iters * cfg.batch_size)
    autocast = autocast_dtype(cfg.dtype, d.device)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, config, checkpoint)
    n_params, flops_per_token = model.num_params(non_embedding=False), model.flops_per_token(cfg.seq_len)
    report = dict(cfg=cfg, d=d, data=data, val_offsets=val_offsets, micro=micro, compare=compare, out_dir=out_dir,
                  n_params=n_params)
    if cfg.eval_only:
        state["val_loss"] = evaluate(model.to(d.device), data, val_offsets, micro, d, autocast)
        finish(state=state, session_time=None, **report)
        return state["val_loss"]
    out_dir.mkdir(parents=True, exist_ok=True)

    compute_dtype = autocast or torch.float32
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.fsdp and d.world == 1:
        log("note: --fsdp has nothing to shard over in one process; training unsharded")
        cfg = replace(cfg, fsdp=False)
    if cfg.fsdp:
        model = shard_model(model, autocast)
        autocast = None  # the FSDP mixed precision policy computes in bf16 already
    else:
        model.to(d.device)
    raw_model = model
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if cfg.compile:
        model = torch.compile(model)
    if d.world > 1 and not cfg.fsdp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                                    broadcast_buffers=False)  # the only buffers are RoPE tables

    it = 0
    if checkpoint is not None:
        load_optimizer_state(raw_model, optimizer, state["optimizer"], cfg.fsdp)
        it = state["iter"]
        set_rng_state(state["rng"][d.rank] if len(state["rng"]) == d.world else state["rng"][0])
        if (state["data"]["seed"], state["data"]["batch_size"], state["data"]["seq_len"]) != \
                (cfg.seed, cfg.batch_size, cfg.seq_len):
            log("warning: seed, batch_size or seq_len differ from the checkpoint's, so the data order changes")
        log(f"resuming from {checkpoint} at iter {it}")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout may differ per rank; the data never does
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    tokens_per_iter = cfg.batch_size * cfg.seq_len
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    peak = (cfg.peak_flops or peak_flops_guess(d.device)) * d.world
    plot_title = f"{cfg.model} on {Path(cfg.data_dir).name}"
    log(f"{n_params / 1e6:.1f}M parameters, {len(data.train):,} train tokens, {tokens_per_iter:,} tokens per iter "
        f"({d.world} processes x {accum} micro-steps x {micro} x {cfg.seq_len}), {d.device}, {compute_dtype}"
        f"{', FSDP' if cfg.fsdp else ''}, out: {out_dir}")
    session_start, time_before = time.time(), state.get("train_time_s", 0.0)

    def save():
        model_sd = model_state(raw_model, cfg.fsdp)
        optim_sd = optimizer_state(raw_model, optimizer, cfg.fsdp)
        rngs = gather_objects(rng_state(), d)
        if d.master:
            def write(folder):
                if cfg.fsdp:
                    save_hf(raw_model.config, model_sd, folder)
                else:
                    raw_model.save_pretrained(folder)
                torch.save({"iter": it, "optimizer": optim_sd, "rng": rngs, "config": asdict(cfg),
                            "data": {"seed": cfg.seed, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                                     "next_iter": it},
                            "initial_val_loss": state["initial_val_loss"], "val_loss": state["val_loss"],
                            "tokens": it * tokens_per_iter, "train_time_s": time_before + time.time() - session_start,
                            "world_size": d.world}, folder / "train_state.pt")
            save_checkpoint(out_dir, write)
        d.barrier()
        return it

    saved_at = it if checkpoint is not None else None
    if checkpoint is None:
        state["initial_val_loss"] = state["val_loss"] = evaluate(model, data, val_offsets, micro, d, autocast)
        log(f"iter 0: val loss {state['val_loss']:.4f}")
        if d.master:
            logbook.write({"iter": 0, "train_loss": None, "val_loss": state["val_loss"], "lr": 0.0,
                           "tokens_per_s": None, "mfu": None})
    kill_at = int(os.environ.get(KILL_AT_ITER_ENV, -1))
    interval_start, interval_iters = time.time(), 0
    while it < cfg.max_iters:
        lr = cosine_lr(it, cfg.lr, cfg.min_lr, cfg.warmup_iters, decay_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = data.train_offsets(it, cfg.seed, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=d.device)
        for k in range(accum):
            x, y = to_device(data.windows(data.train, offsets[k * micro:(k + 1) * micro]), d.device)
            gradient_sync(model, k == accum - 1)
            with torch.autocast(d.device.type, dtype=autocast) if autocast else contextlib.nullcontext():
                _, loss = model(x, targets=y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        if d.world > 1:
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or math.inf)
        train_loss = loss_sum.item() / (accum * d.world)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            where = f"{out_dir / 'ckpt'} (iter {saved_at})" if saved_at is not None else "none: no checkpoint was written"
            raise FloatingPointError(f"{'train loss' if not math.isfinite(train_loss) else 'gradient norm'} is "
                                     f"{train_loss if not math.isfinite(train_loss) else grad_norm} at iter {it + 1}; "
                                     f"training stopped, the last good checkpoint is {where}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        interval_iters += 1

        out_of_time = torch.tensor(float(bool(cfg.max_time_s) and time.time() - command_start > cfg.max_time_s),
                                   device=d.device)
        if d.world > 1 and cfg.max_time_s:
            dist.all_reduce(out_of_time, op=dist.ReduceOp.MAX)  # the ranks' clocks differ a little; all stop
        out_of_time = bool(out_of_time) and it < cfg.max_iters
        evaluating = it % cfg.eval_interval == 0 or it == cfg.max_iters or out_of_time
        if evaluating or it % cfg.log_interval == 0:
            elapsed = time.time() - interval_start
            tokens_per_s = interval_iters * tokens_per_iter / max(elapsed, 1e-9)
            mfu = flops_per_token * tokens_per_s / peak
            val_loss = evaluate(model, data, val_offsets, micro, d, autocast) if evaluating else None
            log(f"iter {it}/{cfg.max_iters}: loss {train_loss:.4f}" + (f", val {val_loss:.4f}" if evaluating else "")
                + f", lr {lr:.2e}, {tokens_per_s:,.0f} tokens/s, {1000 * elapsed / interval_iters:.0f} ms/iter, "
                f"mfu {100 * mfu:.2f}%", flush=True)
            if d.master:
                logbook.write({"iter": it, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
                               "tokens_per_s": tokens_per_s, "mfu": mfu})
            if evaluating:
                if not math.isfinite(val_loss):
                    raise FloatingPointError(f"val loss is {val_loss} at iter {it}; training stopped, the last good "
                                             f"checkpoint is {out_dir / 'ckpt'} (iter {saved_at})")
                state["val_loss"] = val_loss
                if d.master:
                    plot_losses(logbook.rows(), out_dir / "loss.png", plot_title)
            interval_start, interval_iters = time.time(), 0
        if it % (cfg.ckpt_interval or cfg.eval_interval) == 0 or it == cfg.max_iters or out_of_time:
            pause = time.time()
            saved_at = save()
            interval_start += time.time() - pause
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if out_of_time:
            log(f"stopping at iter {it}: --max_time_s={cfg.max_time_s:g} reached")
            break
    if saved_at != it:
        saved_at = save()
    state["train_time_s"] = time_before + time.time() - session_start
    state["tokens"] = it * tokens_per_iter
    if d.master:
        plot_losses(logbook.rows(), out_dir / "loss.png", plot_title)
    finish(state=state, session_time=time.time() - command_start, **report)
    return state["val_loss"]


def finish(cfg, d, data, val_offsets, micro, compare, out_dir, n_params, state, session_time):
    """report.md: initial and final val loss, the drop, tokens seen, time; a reference model's val loss and the gap."""
    ref_loss = None
    if compare is not None:
        ref = Phi.from_pretrained(compare, dtype=torch.bfloat16 if d.device.type == "cuda" else None, device=d.device)
        ref_loss = evaluate(ref, data, val_offsets, micro, d)
        del ref
    if not d.master:
        return
    initial, final = state.get("initial_val_loss"), state["val_loss"]
    model_name = state.get("config", asdict(cfg))["model"]
    rows = [("model", f"{model_name} ({n_params / 1e6:.1f}M parameters)"),
            ("data", f"{cfg.data_dir} ({len(data.train):,} train tokens, {len(data.val):,} val tokens)"),
            ("val set", f"{len(val_offsets)} fixed windows of {cfg.seq_len} tokens from val.bin"),
            ("initial val loss", f"{initial:.4f}"),
            ("final val loss", f"{final:.4f}"),
            ("drop", f"{initial - final:.4f}"),
            ("tokens seen", f"{state.get('tokens', 0):,}"),
            ("wall time (training and evaluation, all sessions)", format_seconds(state.get("train_time_s", 0.0)))]
    if session_time is not None:
        rows.append(("wall time (this command)", format_seconds(session_time)))
    if ref_loss is not None:
        rows += [(f"reference val loss ({cfg.compare})", f"{ref_loss:.4f}"),
                 ("gap (ours - reference)", f"{final - ref_loss:+.4f}")]
    write_report(out_dir / "report.md", f"Pretraining report: {out_dir}", rows,
                 ["Losses are the mean next-token cross-entropy in nats."])
    print(f"report: {out_dir / 'report.md'}: val loss {initial:.4f} -> {final:.4f}"
          + (f" (reference {ref_loss:.4f})" if ref_loss is not None else ""), flush=True)


def main(argv=None):
    try:
        train(parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, TRAIN_PRESETS))
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # bad input or a diverged run: no traceback
        sys.exit(f"train_lm.py: error: {err}")


if __name__ == "__main__":
    main()
