"""
Pretraining (or continued training) of the Phi language model on token data made by data/text/prepare.py.

    python train_lm.py                                    # offline demo on a CPU (prepares the stdlib corpus first)
    python train_lm.py --preset=small --data_dir=data/text/tinystories
    torchrun --nproc_per_node=8 train_lm.py --preset=phi-2 --data_dir=data/text/slimpajama
    python train_lm.py --preset=phi-2 --resume           # continue an interrupted run from out/lm-phi-2/ckpt
    python train_lm.py --out_dir=out/lm-demo --eval_only --compare=microsoft/phi-2

Options are --key=value overrides of TrainConfig on top of a preset (a bare --flag sets a bool to true; --help lists
them). The training batch of iteration i is a function of (seed, i) alone and every rank takes its slice of that global
batch, so a run resumes exactly and N processes train like one. The run folder gets log.jsonl, loss.png, report.md
and ckpt/ (Hugging Face layout + train_state.pt).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import (JsonlLog, LoopConfig, all_reduce, autocast, autocast_dtype, batch_split, close_distributed,
                    format_seconds, gather_objects, gradient_sync, load_train_state, parse_config,
                    plot_losses, prepare_once, reported_errors, restore_rng, return_freed_memory, rng_state,
                    run_checkpoint, save_checkpoint, seed_everything, setup_distributed, train_loop, wrap_ddp)
from common import KILL_AT_ITER_ENV  # noqa: F401 (the resume tests set it)
from model import PRESETS as MODEL_PRESETS
from model import atomic_write
from model import Phi, PhiConfig, resolve_checkpoint
from tokenizer import Tokenizer, tokenizer_fingerprint

REPO = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = "data/text/stdlib"


@dataclass
class TrainConfig(LoopConfig):
    preset: str = "demo"  # a TRAIN_PRESETS entry that sets the defaults; options on the command line win
    model: str = "demo"  # a model.py preset to train from scratch, or an HF folder to continue training
    data_dir: str = DEFAULT_DATA_DIR  # train.bin, val.bin, meta.json; the default corpus is prepared when missing
    out_dir: str = ""  # empty: out/lm-{preset}
    seq_len: int = 128  # tokens per training sequence
    batch_size: int = 16  # global batch: sequences per optimizer step over all processes and micro-steps
    micro_batch_size: int = 0  # sequences per forward in one process; 0: batch_size // processes (no accumulation)
    eval_iters: int = 8  # the val set is eval_iters * batch_size fixed windows of seq_len tokens
    max_time_s: float = 0.0  # stop (evaluate, checkpoint, report) once the command has run this long; 0: no limit
    dtype: str = "auto"  # auto (bfloat16 autocast on a GPU that has it, else float32) | float32 | bfloat16
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # shard parameters, gradients and optimizer state (torch.distributed.fsdp.fully_shard)
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, about a third more compute
    peak_flops: float = 0.0  # per device, for MFU; 0: a guess from the device name
    eval_only: bool = False  # evaluate the checkpoint in out_dir and write report.md, no training
    compare: str = ""  # a reference model (HF folder or hub id) evaluated on the same val windows

    def __post_init__(self):
        super().__post_init__()
        self.check_at_least(1, "seq_len", "batch_size", "eval_iters", "max_iters")
        self.check_at_least(0, "micro_batch_size", "peak_flops", "max_time_s")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"--dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if self.resume and self.eval_only:
            raise ValueError("--resume and --eval_only exclude each other")
        self.out_dir = self.out_dir or f"out/lm-{self.preset}"


ADAMW = dict(weight_decay=0.1, beta2=0.95)  # every preset: GPT-style AdamW
TRAIN_PRESETS = {
    # this CPU: the 4-layer demo model, small batches (the 51,200-way output layer dominates the cost); about
    # 0.5 s per iteration on 2 idle cores; --max_time_s keeps the whole command under 10 minutes on a busy machine
    "demo": dict(**ADAMW, model="demo", seq_len=64, batch_size=8, max_iters=600, lr=3e-3, min_lr=3e-4, warmup_iters=20,
                 eval_interval=50, eval_iters=8, log_interval=10, ckpt_interval=200, max_time_s=480),
    # tests: a 2-layer model, seconds
    "tiny": dict(**ADAMW, model="tiny", seq_len=32, batch_size=4, max_iters=8, lr=3e-3, min_lr=3e-4, warmup_iters=2,
                 eval_interval=4, eval_iters=2, log_interval=1),
    # one GPU, GPT-2-small size
    "small": dict(**ADAMW, model="small", seq_len=1024, batch_size=256, micro_batch_size=16, max_iters=20000, lr=6e-4,
                  min_lr=6e-5, warmup_iters=1000, eval_interval=500, eval_iters=4, log_interval=10, compile=True),
    # a node of GPUs: Phi-2 from random weights, sharded
    "phi-2": dict(**ADAMW, model="phi-2", seq_len=2048, batch_size=512, micro_batch_size=4, max_iters=100000, lr=2e-4,
                  min_lr=2e-5, warmup_iters=2000, eval_interval=1000, eval_iters=2, log_interval=10, fsdp=True,
                  gradient_checkpointing=True, compile=True),
}




def configure_optimizer(model, lr, weight_decay, betas):
    """Fused AdamW with weight decay on weight matrices only: not on biases, LayerNorms or embedding tables."""
    decay, no_decay = [], []
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                (decay if p.dim() >= 2 and not isinstance(module, torch.nn.Embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


# ---- data ----------------------------------------------------------------------------------------------------------


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
        if not isinstance(meta, dict):
            raise ValueError(f"{folder / 'meta.json'} must hold a JSON object (as data/text/prepare.py writes it), "
                             f"not a {type(meta).__name__}")
        ours = tokenizer_fingerprint(Tokenizer())
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
        for split in ("val", "train"):
            largest = largest_id(getattr(self, split))
            if largest >= vocab_size:
                raise ValueError(f"{folder}/{split}.bin has token id {largest}, outside the model's vocabulary of "
                                 f"{vocab_size}: made with another tokenizer, or not token data")

    def windows(self, tokens, offsets):
        xy = torch.from_numpy(np.stack([tokens[o:o + self.seq_len + 1] for o in offsets]).astype(np.int64))
        return xy[:, :-1], xy[:, 1:]

    def train_offsets(self, it, seed, batch_size):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + it)
        return torch.randint(len(self.train) - self.seq_len, (batch_size,), generator=generator).numpy()

    def val_offsets(self, n):
        return np.linspace(0, len(self.val) - self.seq_len - 1, n).astype(np.int64)


def largest_id(tokens, chunk=1 << 24):
    """The largest token id of a memmap: every token up to 2^30 of them, beyond that 64 chunks spread over the file
    (a file made by prepare.py has its ids checked as they were written; this catches a foreign or damaged one)."""
    n = len(tokens)
    starts = range(0, n, chunk) if n <= 1 << 30 else np.linspace(0, n - chunk, 64).astype(np.int64)
    return max(int(tokens[s:s + chunk].max()) for s in starts)


def to_device(tensors, device):
    if device.type == "cuda":
        return [t.pin_memory().to(device, non_blocking=True) for t in tensors]
    return [t.to(device) for t in tensors]


@torch.no_grad()
def evaluate(model, data, offsets, micro, d, dtype=None):
    """Mean loss over the val windows at offsets; rank r takes every world-th window, so any world size agrees."""
    was_training = model.training
    model.eval()
    mine = offsets[d.rank::d.world]
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for i in range(0, len(mine), micro):
        x, y = to_device(data.windows(data.val, mine[i:i + micro]), d.device)
        with autocast(d.device, dtype):
            _, loss = model(x, targets=y)
        total += loss.double() * len(x)
    all_reduce(total, d)
    model.train(was_training)
    return total.item() / len(offsets)


# ---- training -------------------------------------------------------------------------------------------------


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


def shard_model(model, dtype):
    """FSDP (fully_shard) per block and at the root; parameters kept in float32, computed in bf16 when asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
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


def write_report(path, title, rows, notes=()):
    """A markdown report: a two-column table of (name, value) rows, then notes."""
    text = [f"# {title}", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows] + [""] + list(notes)
    atomic_write(path, "\n".join(text).rstrip() + "\n")


# ---- the training loop -------------------------------------------------------------------------------------------


def train(cfg):
    """Train (or with cfg.eval_only, evaluate) as configured; returns the final val loss."""
    d = setup_distributed(cfg.device)
    try:
        return run(cfg, d)
    finally:
        close_distributed(d)


def run(cfg, d):
    log = d.log
    command_start = time.time()
    out_dir = Path(cfg.out_dir)

    # everything that can be wrong is checked before the first step
    per_rank, micro, accum = batch_split(cfg.batch_size, cfg.micro_batch_size, d, "sequences")
    checkpoint = run_checkpoint(cfg, out_dir, also_resume=cfg.eval_only)
    config = model_config(cfg, checkpoint)
    compare = resolve_checkpoint(cfg.compare, "microsoft/phi-2") if cfg.compare else None
    if compare is not None:
        ref_config = PhiConfig.from_hf_json(json.loads((compare / "config.json").read_text()))
        if cfg.seq_len > ref_config.max_position_embeddings:
            raise ValueError(f"--seq_len={cfg.seq_len} is longer than {cfg.compare}'s context of "
                             f"{ref_config.max_position_embeddings} tokens")
    if Path(cfg.data_dir) == Path(DEFAULT_DATA_DIR):  # the demo corpus: this Python's standard library
        prepare_once(d, Path(cfg.data_dir) / "meta.json", REPO / "data" / "text" / "prepare.py",
                     [f"--out_dir={cfg.data_dir}"], what="the default corpus (this Python's standard library)")
    data = TokenData(cfg.data_dir, cfg.seq_len, config.vocab_size)
    # mmap: the ranks of a node share one copy of the optimizer state in the page cache
    state = load_train_state(checkpoint) if checkpoint else {}
    val_offsets = data.val_offsets(cfg.eval_iters * cfg.batch_size)
    dtype = autocast_dtype(cfg.dtype, d.device)

    seed_everything(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, config, checkpoint)
    n_params, flops_per_token = model.num_params(non_embedding=False), model.flops_per_token(cfg.seq_len)
    report = dict(cfg=cfg, d=d, data=data, val_offsets=val_offsets, micro=micro, compare=compare, out_dir=out_dir,
                  n_params=n_params)
    if cfg.eval_only:
        state["val_loss"] = evaluate(model.to(d.device), data, val_offsets, micro, d, dtype)
        finish(state=state, session_time=None, **report)
        return state["val_loss"]
    out_dir.mkdir(parents=True, exist_ok=True)

    compute_dtype = dtype or torch.float32
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.fsdp and d.world == 1:
        log("note: --fsdp has nothing to shard over in one process; training unsharded")
        cfg = replace(cfg, fsdp=False)
    if cfg.fsdp:
        model = shard_model(model, dtype)
        dtype = None  # the FSDP mixed precision policy computes in bf16 already
    else:
        model.to(d.device)
    raw_model = model
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    if cfg.compile:
        model = torch.compile(model)
    if not cfg.fsdp:
        model = wrap_ddp(model, d, broadcast_buffers=False)  # the only buffers are RoPE tables

    it = 0
    if checkpoint is not None:
        load_optimizer_state(raw_model, optimizer, state["optimizer"], cfg.fsdp)
        it = state["iter"]
        restore_rng(state, d)
        if (state["data"]["seed"], state["data"]["batch_size"], state["data"]["seq_len"]) != \
                (cfg.seed, cfg.batch_size, cfg.seq_len):
            log("warning: seed, batch_size or seq_len differ from the checkpoint's, so the data order changes")
        log(f"resuming from {checkpoint} at iter {it}")
    else:
        torch.manual_seed(cfg.seed + 1 + d.rank)  # dropout may differ per rank; the data never does
    logbook = JsonlLog(out_dir / "log.jsonl", keep_until_iter=it if checkpoint else None) if d.master else None
    tokens_per_iter = cfg.batch_size * cfg.seq_len
    peak = (cfg.peak_flops or peak_flops_guess(d.device)) * d.world
    plot_title = f"{cfg.model} on {Path(cfg.data_dir).name}"
    log(f"{n_params / 1e6:.1f}M parameters, {len(data.train):,} train tokens, {tokens_per_iter:,} tokens per iter "
        f"({d.world} processes x {accum} micro-steps x {micro} x {cfg.seq_len}), {d.device}, {compute_dtype}"
        f"{', FSDP' if cfg.fsdp else ''}, out: {out_dir}")
    time_before = state.get("train_time_s", 0.0)

    def save(at):
        model_sd = model_state(raw_model, cfg.fsdp)
        optim_sd = optimizer_state(raw_model, optimizer, cfg.fsdp)
        rngs = gather_objects(rng_state(), d)
        if d.master:
            def write(folder):
                if cfg.fsdp:
                    save_hf(raw_model.config, model_sd, folder)
                else:
                    raw_model.save_pretrained(folder)
                torch.save({"iter": at, "optimizer": optim_sd, "rng": rngs, "config": asdict(cfg),
                            "data": {"seed": cfg.seed, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
                                     "next_iter": at},
                            "initial_val_loss": state["initial_val_loss"], "val_loss": state["val_loss"],
                            "tokens": at * tokens_per_iter, "train_time_s": time_before + time.time() - session_start,
                            "world_size": d.world}, folder / "train_state.pt")
            save_checkpoint(out_dir, write)
        d.barrier()

    def step(it):
        offsets = data.train_offsets(it, cfg.seed, cfg.batch_size)[d.rank * per_rank:(d.rank + 1) * per_rank]
        loss_sum = torch.zeros((), device=d.device)
        for k in range(accum):
            x, y = to_device(data.windows(data.train, offsets[k * micro:(k + 1) * micro]), d.device)
            gradient_sync(model, k == accum - 1)
            with autocast(d.device, dtype):
                _, loss = model(x, targets=y)
            (loss / accum).backward()
            loss_sum += loss.detach()
        return all_reduce(loss_sum, d).item() / (accum * d.world)

    def out_of_time(it):
        late = torch.tensor(float(bool(cfg.max_time_s) and time.time() - command_start > cfg.max_time_s),
                            device=d.device)
        if cfg.max_time_s:
            all_reduce(late, d, op=dist.ReduceOp.MAX)  # the ranks' clocks differ a little; all stop
        if bool(late) and it < cfg.max_iters:
            log(f"stopping at iter {it}: --max_time_s={cfg.max_time_s:g} reached")
            return True
        return False

    def report_row(it, row, evaluating, timing):
        tokens_per_s = timing["iters"] * tokens_per_iter / timing["seconds"]
        row.update(val_loss=None, tokens_per_s=tokens_per_s, mfu=flops_per_token * tokens_per_s / peak)
        if evaluating:
            row["val_loss"] = evaluate(model, data, val_offsets, micro, d, dtype)
        log(f"iter {timing['progress']}: loss {row['train_loss']:.4f}"
            + (f", val {row['val_loss']:.4f}" if evaluating else "")
            + f", lr {row['lr']:.2e}, {tokens_per_s:,.0f} tokens/s, {1000 * timing['seconds'] / timing['iters']:.0f} "
            f"ms/iter, mfu {100 * row['mfu']:.2f}%", flush=True)
        if d.master:
            logbook.write(row)
        if evaluating:
            if not math.isfinite(row["val_loss"]):
                raise FloatingPointError(f"val loss is {row['val_loss']} at iter {it}; training stopped, the last good "
                                         f"checkpoint is {out_dir / 'ckpt'}")
            state["val_loss"] = row["val_loss"]
            if d.master:
                plot_losses(logbook.rows(), out_dir / "loss.png", plot_title)

    if checkpoint is None:
        state["initial_val_loss"] = state["val_loss"] = evaluate(model, data, val_offsets, micro, d, dtype)
        log(f"iter 0: val loss {state['val_loss']:.4f}")
        if d.master:
            logbook.write({"iter": 0, "train_loss": None, "val_loss": state["val_loss"], "lr": 0.0,
                           "tokens_per_s": None, "mfu": None})
    session_start = time.time()
    it, state["train_time_s"] = train_loop(
        cfg, it=it, max_iters=cfg.max_iters, optimizer=optimizer, parameters=raw_model.parameters, step=step,
        report=report_row, save=save, saved_at=it if checkpoint is not None else None, time_before=time_before,
        stop=out_of_time if cfg.max_time_s else None, checkpoint_name=str(out_dir / "ckpt"))
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
    return_freed_memory()  # big short-lived tensors go back to the system (peak memory)
    with reported_errors("train_lm.py"):
        train(parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, TRAIN_PRESETS, doc=__doc__))


if __name__ == "__main__":
    main()
