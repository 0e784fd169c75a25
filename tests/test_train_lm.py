"""Tests for train_lm.py: exact resume after SIGKILL, DDP/FSDP on CPU == one process, HF-loadable checkpoints,
reports, and clear errors for bad options and bad data before any training."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import train_lm  # noqa: E402
from model import Phi, PhiConfig  # noqa: E402
import common  # noqa: E402
from common import parse_config  # noqa: E402
from train_lm import TRAIN_PRESETS, TrainConfig  # noqa: E402

RUN = ["--preset=tiny", "--max_iters=6", "--batch_size=4", "--micro_batch_size=2", "--eval_interval=3",
       "--ckpt_interval=6", "--log_interval=1"]  # val at 0, 3, 6; a checkpoint at the end


def run_cli(args, env=None, launcher=(), timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, str(REPO / "train_lm.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def torchrun(nproc):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ("-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}")


def log_rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def losses(out_dir):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in log_rows(out_dir)]


def weights(folder):
    return Phi.from_pretrained(folder).state_dict()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on 2 shared cores, OpenMP threads that spin-wait make busy times several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny token folder: paragraphs of two standard library modules as documents (a sample, not the corpus)."""
    root = tmp_path_factory.mktemp("lmdata")
    spec = importlib.util.spec_from_file_location("text_prepare_for_lm", REPO / "data/text/prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = prepare
    spec.loader.exec_module(prepare)
    paragraphs = []
    for name in ("json/decoder.py", "textwrap.py"):
        paragraphs += [p for p in (prepare.stdlib_dir() / name).read_text().split("\n\n") if p.strip()]
    with open(root / "docs.jsonl", "w") as f:
        for p in paragraphs:
            f.write(json.dumps({"text": p}) + "\n")
    prepare.prepare([root / "docs.jsonl"], root / "tokens", val_fraction=0.2, num_proc=1, progress=False)
    return root / "tokens"


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """One uninterrupted single-process run that the other runs must reproduce."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    result = run_cli(RUN + [f"--data_dir={data_dir}", f"--out_dir={out}"])
    assert result.returncode == 0, result.stderr
    return out


def test_run_writes_log_plot_report_and_checkpoint(reference_run):
    rows = losses(reference_run)
    assert [r[0] for r in rows] == list(range(7))
    val = {i: v for i, _, v in rows if v is not None}
    assert sorted(val) == [0, 3, 6] and val[6] < val[0] - 0.5  # it learns
    log_keys = json.loads((reference_run / "log.jsonl").read_text().splitlines()[-1]).keys()
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu"} <= set(log_keys)
    report = (reference_run / "report.md").read_text()
    assert f"| initial val loss | {val[0]:.4f} |" in report and f"| final val loss | {val[6]:.4f} |" in report
    assert f"| drop | {val[0] - val[6]:.4f} |" in report and "| tokens seen | 768 |" in report
    from PIL import Image
    with Image.open(reference_run / "loss.png") as img:
        assert img.format == "PNG" and img.size == (900, 540)
        assert len(img.convert("RGB").getcolors(maxcolors=100000)) > 10  # axes, text and two colored curves, not blank
    state = torch.load(reference_run / "ckpt" / "train_state.pt", weights_only=False)
    assert state["iter"] == 6 and state["initial_val_loss"] == val[0] and state["data"]["next_iter"] == 6
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"][0])
    assert not (reference_run / "ckpt.tmp").exists() and not (reference_run / "ckpt.old").exists()


def test_sigkill_then_resume_follows_the_uninterrupted_run_exactly(reference_run, data_dir, tmp_path):
    out = tmp_path / "killed"
    args = RUN + [f"--data_dir={data_dir}", f"--out_dir={out}", "--ckpt_interval=2"]  # at 2, 4, 6
    killed = run_cli(args, env={train_lm.KILL_AT_ITER_ENV: "5"})
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["iter"] == 4
    assert [r[0] for r in losses(out)] == list(range(6))  # it got to iter 5, past the last checkpoint
    resumed = run_cli(args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "at iter 4" in resumed.stdout
    assert losses(out) == losses(reference_run)  # same data order, same RNG: bit for bit
    ours, theirs = weights(out / "ckpt"), weights(reference_run / "ckpt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert "| initial val loss | " in (out / "report.md").read_text()
    initial = [line for line in (out / "report.md").read_text().splitlines() if "initial val loss" in line]
    assert initial == [line for line in (reference_run / "report.md").read_text().splitlines() if "initial val loss" in line]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_the_same_global_batch(mode, reference_run, data_dir, tmp_path):
    """Every process (one thread each, as the reference) computes its micro-batch exactly as the reference's
    micro-step does; the loss is scaled by world / batch, a power of two away from the reference's scale, and the
    all-reduce adds two values, which commutes: so the gradients, and everything after them, are the same to the bit.
    Only FSDP's gradient norm differs: it sums the squares of 14M fp32 gradient elements shard by shard, another
    order than one process's blocked sum (4e-6 relative apart here; a blocked fp32 sum of n terms in runs of k is
    good to about k * 2^-24), so its clip coefficient differs in the last bits; the norm is compared to 1e-4 (a
    missing or doubled shard would be tens of percent off), and the weights exactly with clipping off. Held-out windows are batched differently per process (each takes every
    world-th), so val losses agree to fp32 rounding: 1e-6 relative, about 16 units in the last place."""
    out = tmp_path / mode
    extra = ["--micro_batch_size=0"] + (["--fsdp"] if mode == "fsdp" else [])
    result = run_cli(RUN + extra + [f"--data_dir={data_dir}", f"--out_dir={out}"], launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes x 1 micro-steps x 2" in result.stdout
    rows, reference = log_rows(out), log_rows(reference_run)
    assert [r["iter"] for r in rows] == [r["iter"] for r in reference]
    for a, b in zip(rows, reference):
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        assert a["val_loss"] is None or a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)
    if mode == "ddp":
        assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in reference]
        ours, theirs = weights(out / "ckpt"), weights(reference_run / "ckpt")
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        return
    assert rows[1]["train_loss"] == reference[1]["train_loss"]  # the first step's gradients are the same
    assert rows[1]["grad_norm"] == pytest.approx(reference[1]["grad_norm"], rel=1e-4)
    unclipped = RUN + ["--grad_clip=0", f"--data_dir={data_dir}"]
    assert run_cli(unclipped + [f"--out_dir={tmp_path / 'ref0'}"]).returncode == 0
    result = run_cli(unclipped + extra + [f"--out_dir={tmp_path / 'fsdp0'}"], launcher=torchrun(2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["train_loss"] for r in log_rows(tmp_path / "fsdp0")] == [r["train_loss"] for r in log_rows(tmp_path / "ref0")]
    ours, theirs = weights(tmp_path / "fsdp0" / "ckpt"), weights(tmp_path / "ref0" / "ckpt")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_checkpoint_loads_in_transformers_with_identical_logits(reference_run):
    transformers = pytest.importorskip("transformers")
    ckpt = reference_run / "ckpt"
    hf = transformers.PhiForCausalLM.from_pretrained(ckpt).eval()
    ours = Phi.from_pretrained(ckpt).eval()
    idx = torch.randint(0, 50295, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_nan_stops_training_and_keeps_the_last_good_checkpoint_then_eval_only_compare(reference_run, data_dir, tmp_path):
    out = tmp_path / "diverge"
    shutil.copytree(reference_run, out)
    before = weights(out / "ckpt")
    cfg = parse_config(TrainConfig, RUN + [f"--data_dir={data_dir}", f"--out_dir={out}", "--resume", "--max_iters=9",
                                           "--ckpt_interval=2",
                                           "--lr=1e30", "--min_lr=0", "--warmup_iters=0"], TRAIN_PRESETS)
    with pytest.raises(FloatingPointError, match=r"at iter 8; training stopped, the last good checkpoint is .*ckpt \(iter 6\)"):
        train_lm.train(cfg)
    assert torch.load(out / "ckpt" / "train_state.pt", weights_only=False)["iter"] == 6
    after = weights(out / "ckpt")
    assert all(torch.equal(before[k], after[k]) for k in before)

    # --eval_only: the checkpoint's val loss again, and a reference (here: itself) on the same val windows
    cfg = replace(cfg, resume=False, eval_only=True, compare=str(reference_run / "ckpt"))
    val = train_lm.train(cfg)
    report = (out / "report.md").read_text()
    assert val == pytest.approx(losses(reference_run)[-1][2], abs=1e-6)
    assert f"| final val loss | {val:.4f} |" in report and "| gap (ours - reference) | +0.0000 |" in report
    assert f"reference val loss ({reference_run / 'ckpt'})" in report


def test_bad_options_are_rejected_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown option --nope; valid options are: .*--batch_size.*--resume"):
        parse_config(TrainConfig, ["--nope=1"], TRAIN_PRESETS)
    for args, message in [(["--batch_size=0"], "--batch_size must be at least 1, not 0"),
                          (["--batch_size=abc"], "--batch_size=abc: expected an integer"),
                          (["--lr=fast"], "--lr=fast: expected a number"),
                          (["--lr=0"], "--lr must be a positive number"),
                          (["--compile=maybe"], "--compile=maybe: expected true or false"),
                          (["--max_iters"], "--max_iters needs a value"),
                          (["--preset=huge"], "unknown preset 'huge'"),
                          (["--dtype=int8"], "--dtype must be"),
                          (["max_iters=3"], "options look like --key=value")]:
        with pytest.raises(ValueError, match=message):
            parse_config(TrainConfig, args, TRAIN_PRESETS)
    cfg = parse_config(TrainConfig, ["--preset=tiny", "--max_iters=1e3", "--resume", "--lr=1e-3"], TRAIN_PRESETS)
    assert (cfg.model, cfg.max_iters, cfg.resume, cfg.lr, cfg.out_dir) == ("tiny", 1000, True, 1e-3, "out/lm-tiny")

    out = tmp_path / "never"
    result = run_cli(["--batch_size=0", f"--out_dir={out}"], timeout=120)
    assert result.returncode == 2 and "train_lm.py: error: --batch_size must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_bad_data_is_rejected_before_training(data_dir, tmp_path):
    def attempt(folder, *extra):
        cfg = parse_config(TrainConfig, RUN + [f"--data_dir={folder}", f"--out_dir={tmp_path / 'out'}", *extra],
                           TRAIN_PRESETS)
        train_lm.train(cfg)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        attempt(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(data_dir / "train.bin", partial)
    with pytest.raises(FileNotFoundError, match="has no val.bin, meta.json"):
        attempt(partial)

    foreign = tmp_path / "foreign"
    shutil.copytree(data_dir, foreign)
    meta = json.loads((foreign / "meta.json").read_text())
    (foreign / "meta.json").write_text(json.dumps({**meta, "tokenizer": "llama", "tokenizer_fingerprint": "0123abcd"}))
    with pytest.raises(ValueError, match="made with another tokenizer"):
        attempt(foreign)

    swapped = tmp_path / "swapped"  # a val.bin from another tokenizer's preparation, with our meta.json
    shutil.copytree(data_dir, swapped)
    np.arange(60000, 60000 + meta["val_tokens"], dtype=np.uint16).tofile(swapped / "val.bin")
    with pytest.raises(ValueError, match="val.bin has token id 6.* outside the model's vocabulary .* another tokenizer"):
        attempt(swapped)
    np.zeros(meta["val_tokens"] + 7, dtype=np.uint16).tofile(swapped / "val.bin")
    with pytest.raises(ValueError, match="val.bin holds .* tokens but meta.json says"):
        attempt(swapped)

    noise = tmp_path / "noise"  # random uint16 in train.bin: an IndexError at the first step before it was checked
    shutil.copytree(data_dir, noise)
    np.random.default_rng(0).integers(0, 65536, meta["train_tokens"], dtype=np.uint16).tofile(noise / "train.bin")
    with pytest.raises(ValueError, match="train.bin has token id .* outside the model's vocabulary"):
        attempt(noise)
    listed = tmp_path / "listed"  # a meta.json holding a list: an AttributeError before
    shutil.copytree(data_dir, listed)
    (listed / "meta.json").write_text(json.dumps([meta]))
    with pytest.raises(ValueError, match="must hold a JSON object .* not a list"):
        attempt(listed)
    (listed / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        attempt(listed)

    with pytest.raises(ValueError, match="not a multiple of --micro_batch_size=3"):
        attempt(data_dir, "--micro_batch_size=3")
    with pytest.raises(ValueError, match="longer than the model's context"):
        attempt(data_dir, "--seq_len=4096")
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint in"):
        attempt(data_dir, "--resume")
    assert not (tmp_path / "out").exists()


def test_batches_are_a_function_of_seed_and_iteration(data_dir):
    data = train_lm.TokenData(data_dir, 16, 51200)
    a, b = data.train_offsets(5, 1, 8), data.train_offsets(5, 1, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, data.train_offsets(6, 1, 8))
    assert not np.array_equal(a, data.train_offsets(5, 2, 8))
    x, y = data.windows(data.train, a[:2])
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert np.array_equal(data.val_offsets(6), data.val_offsets(6)) and data.val_offsets(6).max() + 17 <= len(data.val)


def test_optimizer_groups_and_schedule():
    model = Phi(PhiConfig.from_preset("tiny"))
    opt = train_lm.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert "lm_head.weight" in names and "model.layers.0.mlp.fc1.weight" in names
    assert not any(n.endswith("bias") or "layernorm" in n or "embed_tokens" in n for n in names)
    assert len(decayed) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))
    lrs = [common.cosine_lr(i, 1.0, 0.1, 10, 100) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == lrs[119] == pytest.approx(0.1)


def test_checkpoint_files_reach_the_disk_before_the_swap(tmp_path, monkeypatch):
    """Every file and folder of the new checkpoint is fsynced before the rename that makes it the checkpoint, and
    the parent folder after it (so a power loss cannot leave a renamed but empty checkpoint)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def fill(folder):
        (folder / "train_state.pt").write_text("state")
        (folder / "vision").mkdir()
        (folder / "vision" / "model.safetensors").write_text("weights")

    common.save_checkpoint(tmp_path, fill)
    swap = next(i for i, e in enumerate(events) if e[0] == "replace" and e[1].endswith("ckpt.tmp"))
    synced_before = {e[1] for e in events[:swap] if e[0] == "fsync"}
    tmp = str((tmp_path / "ckpt.tmp").resolve())
    assert {tmp + "/train_state.pt", tmp + "/vision/model.safetensors", tmp + "/vision", tmp} <= synced_before
    assert ("fsync", str(tmp_path.resolve())) in events[swap + 1:]
    assert (tmp_path / "ckpt" / "vision" / "model.safetensors").read_text() == "weights"


def test_checkpoint_swap_never_leaves_a_half_checkpoint(tmp_path):
    def write(tag):
        def fill(folder):
            (folder / "train_state.pt").write_text(tag)
        return fill

    common.save_checkpoint(tmp_path, write("one"))
    assert (tmp_path / "ckpt" / "train_state.pt").read_text() == "one"

    def crash(folder):
        (folder / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(tmp_path, crash)
    assert common.find_checkpoint(tmp_path) == tmp_path / "ckpt"
    assert (tmp_path / "ckpt" / "train_state.pt").read_text() == "one"
    os.replace(tmp_path / "ckpt", tmp_path / "ckpt.old")  # a crash between the two renames of a swap
    assert common.find_checkpoint(tmp_path) == tmp_path / "ckpt.old"
    common.save_checkpoint(tmp_path, write("two"))
    assert common.find_checkpoint(tmp_path) == tmp_path / "ckpt" and not (tmp_path / "ckpt.old").exists()
