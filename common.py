"""
What every script here shares: `--key=value` options over a dataclass (with `--help`), processes and devices
(torch.distributed), seeds and RNG state, checkpoint folders that are swapped in whole, the JSONL log and its loss
plot, markdown reports, the learning-rate schedule, and the training-loop skeleton that train_lm.py, train_mm.py
and train_clip.py run.
"""

import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import textwrap
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from model import atomic_write, fsync_folder

KILL_AT_ITER_ENV = "OMNIPHI_SIGKILL_AT_ITER"  # tests only: SIGKILL the training process after that iteration


# ---- command line ------------------------------------------------------------------------------------------------


class UsageError(SystemExit):
    """A mistake on the command line or in its paths: the message is printed (no traceback) and the exit code is 2."""

    def __init__(self, message):
        super().__init__(message)
        self.code = 2


def fail(script, err):
    """Print `script: error: message` and exit with code 2."""
    print(f"{script}: error: {err}", file=sys.stderr, flush=True)
    raise UsageError(str(err))


@contextlib.contextmanager
def reported_errors(script):
    """Bad input (a ValueError, FileNotFoundError or FileExistsError) -> `script: error: ...` and exit 2; a run that
    diverged (FloatingPointError) -> its message and exit 1. No traceback for either."""
    try:
        yield
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        fail(script, err)
    except FloatingPointError as err:
        sys.exit(f"{script}: error: {err}")


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


def parse_options(cls, argv):
    """{field: typed value} of the `--key=value` arguments for the `cls` dataclass, as the command line gave them."""
    types = {f.name: f.type for f in fields(cls)}
    given = {}
    for arg in argv:
        key, has_value, text = arg.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if not arg.startswith("--") or not key:
            raise ValueError(f"unexpected argument {arg!r}: options look like --key=value (--help lists them)")
        if key not in types:
            raise ValueError(f"unknown option --{key}; valid options are: {', '.join('--' + k for k in sorted(types))}")
        if not has_value and types[key] is not bool:
            raise ValueError(f"--{key} needs a value: --{key}=...")
        given[key] = parse_value(key, types[key], text if has_value else "true")
    return given


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)


def parse_config(cls, argv, presets=None, *, doc=None):
    """A `cls` dataclass from `--key=value` arguments (a bare `--flag` sets a bool). With presets, `--preset=name`
    (or the field's default) picks the defaults first. Unknown keys and bad values raise ValueError; `-h`/`--help`
    prints every option (type, default, description) and the presets, then exits 0."""
    if wants_help(argv):
        print(help_text(cls, presets, doc))
        raise SystemExit(0)
    given = parse_options(cls, argv)
    values = {}
    if presets is not None:
        name = given.get("preset", next(f.default for f in fields(cls) if f.name == "preset"))
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets)}")
        values.update(presets[name])
    values.update(given)
    return cls(**values)


def field_descriptions(cls):
    """{field: its description}: the comment after each field of the dataclass's source, continuation lines joined."""
    out, last = {}, None
    try:  # the class and the dataclasses it inherits from
        source = "\n".join(inspect.getsource(c) for c in reversed(cls.__mro__) if dataclasses.is_dataclass(c))
    except (OSError, TypeError):  # no source file (e.g. a frozen program): no descriptions
        return out
    for line in source.splitlines():
        field_line = re.match(r"\s+(\w+)\s*:\s*[^=#]+=[^#]*(?:#\s*(.*))?$", line)
        if field_line:
            last = field_line.group(1)
            out[last] = (field_line.group(2) or "").strip()
        elif last and re.match(r"\s+#", line):
            out[last] = f"{out[last]} {line.strip().lstrip('#').strip()}".strip()
        else:
            last = None
    return out


def help_text(cls, presets=None, doc=None):
    """The usage text: the script's docstring, every option with its type, default and description, the presets."""
    script = Path(sys.argv[0]).name or "script"
    parts = [inspect.cleandoc(doc) if doc else f"usage: python {script} [--key=value ...]", "", "options:"]
    described = field_descriptions(cls)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = {bool: "BOOL", int: "INT", float: "FLOAT"}.get(f.type, "STR")
        parts.append(f"  --{f.name}={kind}  (default: {default!r})")
        if described.get(f.name):
            parts += textwrap.wrap(described[f.name], 100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    if presets:
        parts += ["", "presets (--preset=NAME sets these defaults; options given on the command line win):"]
        for name, values in presets.items():
            flat = " ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, dict)) or "(none)"
            parts += textwrap.wrap(f"{name}: {flat}", 100, initial_indent="  ", subsequent_indent=" " * 6)
            for stage, stage_values in ((k, v) for k, v in values.items() if isinstance(v, dict)):
                flat = " ".join(f"{k}={v}" for k, v in stage_values.items())
                parts += textwrap.wrap(f"{stage}: {flat}", 100, initial_indent="    ", subsequent_indent=" " * 8)
    parts += ["", "-h, --help: this text"]
    return "\n".join(parts)


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

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)


def resolve_device(device="auto", local_rank=0):
    """A torch.device for --device: auto | cpu | cuda | cuda:N | mps. Raises ValueError with a clear message for names
    torch does not know and for a device this machine lacks."""
    if device in ("auto", "", None):
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", str(device)):
        raise ValueError(f"--device={device} is not a device; use auto, cpu, cuda or cuda:N")
    given, device = device, torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"--device={given} but {built}; use --device=cpu (or auto)")
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device={given} but this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device=mps but no Apple GPU is available; use --device=cpu")
    return device


def setup_distributed(device="auto"):
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPU); pick this rank's device."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = resolve_device(device, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local, world, device)


def return_freed_memory():
    """Make glibc hand freed blocks of 1 MB or more straight back to the system (M_MMAP_THRESHOLD, as
    MALLOC_MMAP_THRESHOLD_=1048576 sets it): otherwise the heaps that large short-lived tensors (dequantized
    weights, activations, decoded images) were carved from stay with the process and its peak memory grows."""
    import ctypes
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").mallopt(-3, 2 ** 20)


def close_distributed(d):
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def autocast_dtype(dtype, device):
    """The autocast dtype for --dtype, or None for plain float32."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if dtype == "bfloat16" else None


def autocast(device, dtype):
    """torch.autocast for dtype, or nothing when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


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


def all_reduce(tensor, d, op=None):
    """Sum (or op) a tensor over the processes, in place; returns it."""
    if d.world > 1:
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


def wrap_ddp(model, d, **kwargs):
    """DistributedDataParallel over the processes, or the model itself in one process."""
    if d.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                                               **kwargs)


def gradient_sync(model, sync):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = sync


# ---- checkpoints, logs, plots, reports ------------------------------------------------------------------------


def save_checkpoint(out_dir, write, name="ckpt"):
    """write(folder) fills a temporary folder, which is flushed to disk and then swapped in, so that out_dir/name (or,
    after a crash in the middle of the swap, out_dir/name.old) is always a whole checkpoint, even after a power loss."""
    out_dir = Path(out_dir)
    final, tmp, old = out_dir / name, out_dir / f"{name}.tmp", out_dir / f"{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for path in sorted(tmp.rglob("*"), reverse=True):  # files first, then the folders that hold them
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_folder(path)
    fsync_folder(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_folder(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir, name="ckpt"):
    """The whole checkpoint folder in out_dir, or None."""
    for folder in (Path(out_dir) / name, Path(out_dir) / f"{name}.old"):
        if (folder / "train_state.pt").is_file():
            return folder
    return None


def run_checkpoint(cfg, out_dir, also_resume=False):
    """The checkpoint a run continues from (with --resume, or also_resume), else None; refuses to start again over a
    finished or interrupted run without --overwrite."""
    out_dir = Path(out_dir)
    resuming = cfg.resume or also_resume
    checkpoint = find_checkpoint(out_dir) if resuming else None
    if resuming and checkpoint is None:
        raise FileNotFoundError(f"--{'resume' if cfg.resume else 'eval_only'}: no checkpoint in {out_dir} "
                                f"(expected {out_dir / 'ckpt' / 'train_state.pt'})")
    if checkpoint is None and (out_dir / "ckpt").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out_dir} already holds a checkpoint: pass --resume to continue it or --overwrite to "
                              "start again")
    return checkpoint


def batch_split(batch_size, micro_batch_size, d, what="records"):
    """(per process, per micro-step, micro-steps) of a global batch."""
    if batch_size % d.world:
        raise ValueError(f"--batch_size={batch_size} is not divisible by the {d.world} processes")
    per_rank = batch_size // d.world
    micro = micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"each process takes {per_rank} {what} per step, not a multiple of --micro_batch_size={micro}")
    return per_rank, micro, per_rank // micro


def load_train_state(checkpoint):
    return torch.load(Path(checkpoint) / "train_state.pt", map_location="cpu", mmap=True, weights_only=False)


def restore_rng(state, d):
    """This process's RNG state from a checkpoint (that of process 0 when the process count changed)."""
    set_rng_state(state["rng"][d.rank] if len(state["rng"]) == d.world else state["rng"][0])


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


@dataclass
class LoopConfig:
    """The options of the training loop that every trainer shares (train_lm.py, train_clip.py, train_mm.py); each
    trainer's config adds its own after these, and its presets set what suits it."""
    max_iters: int = 0  # optimizer steps in all (train_mm.py, train_clip.py: 0 means `epochs` passes over the data)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # learning rate at the end of the cosine
    warmup_iters: int = 20  # linear warmup steps to lr
    lr_decay_iters: int = 0  # end of the cosine; 0: max_iters
    weight_decay: float = 0.0  # AdamW weight decay (weight matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # clip the gradient norm to this; 0: off
    eval_interval: int = 100  # evaluate (held-out loss) every this many steps
    log_interval: int = 10  # log a line every this many steps
    ckpt_interval: int = 0  # checkpoint every this many steps; 0: at every evaluation (always one at the end)
    seed: int = 1337  # seeds new weights, the data order and the split
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    resume: bool = False  # continue the run in out_dir from its checkpoint
    overwrite: bool = False  # start again in an out_dir that holds a checkpoint

    def __post_init__(self):
        self.check_at_least(1, "eval_interval", "log_interval")
        self.check_at_least(0, "max_iters", "warmup_iters", "lr_decay_iters", "ckpt_interval", "weight_decay",
                            "grad_clip", "min_lr")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, not {self.lr}")
        if self.min_lr > self.lr:
            raise ValueError(f"--min_lr ({self.min_lr}) must not exceed --lr ({self.lr})")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1), not {getattr(self, name)}")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device)):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, not {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")

    def check_at_least(self, low, *names):
        for name in names:
            if getattr(self, name) < low:
                raise ValueError(f"--{name} must be {'at least 1' if low == 1 else '>= 0'}, not {getattr(self, name)}")

    def lr_at(self, it, max_iters):
        return cosine_lr(it, self.lr, self.min_lr, self.warmup_iters, self.lr_decay_iters or max_iters)


def cosine_lr(it, lr, min_lr, warmup_iters, decay_iters):
    """Linear warmup to lr, then a cosine down to min_lr at decay_iters, then min_lr."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(decay_iters - warmup_iters, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


@dataclass
class Progress:
    """What a log line says about where the run is: iterations, elapsed time and the estimated time left."""
    it: int
    max_iters: int
    elapsed_s: float  # training time of this run, earlier sessions included
    eta_s: float

    def __str__(self):
        return f"{self.it}/{self.max_iters} ({format_seconds(self.elapsed_s)} elapsed, {format_seconds(self.eta_s)} left)"


def train_loop(cfg, *, it, max_iters, optimizer, parameters, step, report, save, saved_at=None, time_before=0.0,
               stop=None, checkpoint_name="ckpt"):
    """The loop of every trainer here, as the LoopConfig cfg says. Each iteration: set the learning rate (the cosine
    schedule at it, times each parameter group's lr_scale), `step(it)` (forward and backward of the iteration's batch, returning its mean loss), clip the gradient of parameters() (asked anew each time: FSDP
    replaces the parameter objects at its first forward),
    refuse a non-finite loss or gradient naming the last good checkpoint, take the optimizer step. Then, every
    log_interval and every eval_interval iterations and at the end, `report(it, row, evaluating, interval)`; every
    ckpt_interval (0: eval_interval) iterations and at the end, `save(it)`. `stop(it)`, if given, ends the run early
    (evaluated, saved). saved_at: the iteration of the checkpoint resumed from. Returns (last iteration, train seconds of all sessions)."""
    session_start, interval_start, interval_iters, start_it = time.time(), time.time(), 0, it
    kill_at = int(os.environ.get(KILL_AT_ITER_ENV, -1))

    def train_time():
        return time_before + time.time() - session_start

    while it < max_iters:
        lr = cfg.lr_at(it, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        train_loss = step(it)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters(), cfg.grad_clip or math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            where = f"{checkpoint_name} (iter {saved_at})" if saved_at is not None else "none: no checkpoint was written"
            what = "train loss" if not math.isfinite(train_loss) else "gradient norm"
            raise FloatingPointError(f"{what} is {train_loss if what == 'train loss' else grad_norm} at iter {it + 1}; "
                                     f"training stopped, the last good checkpoint is {where}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        it += 1
        interval_iters += 1
        stopping = stop is not None and stop(it) and it < max_iters
        evaluating = it % cfg.eval_interval == 0 or it == max_iters or stopping
        if evaluating or it % cfg.log_interval == 0:
            elapsed = train_time()
            eta = (time.time() - session_start) / (it - start_it) * (max_iters - it)
            row = {"iter": it, "train_loss": train_loss, "lr": lr, "grad_norm": grad_norm, "elapsed_s": elapsed,
                   "eta_s": eta}
            report(it, row, evaluating, {"seconds": max(time.time() - interval_start, 1e-9), "iters": interval_iters,
                                         "progress": Progress(it, max_iters, elapsed, eta)})
            interval_start, interval_iters = time.time(), 0
        if it % (cfg.ckpt_interval or cfg.eval_interval) == 0 or it == max_iters or stopping:
            pause = time.time()
            save(it)
            saved_at = it
            interval_start += time.time() - pause
        if it == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if stopping:
            break
    if saved_at != it:
        save(it)
    return it, train_time()


def prepare_once(d, done, script, args=(), what="the data"):
    """Run a data preparation script (in a subprocess: scripts never import scripts) in the master process unless
    the file `done` exists; the other processes wait for it."""
    import subprocess

    if not Path(done).exists():
        if d.master:
            print(f"preparing {what} ({script})", flush=True)
            result = subprocess.run([sys.executable, str(script), *args])
            if result.returncode:
                raise RuntimeError(f"preparing {what} with {script} failed (see the message above)")
        d.barrier()
