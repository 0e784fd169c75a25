"""
QLoRA memory at Phi-2 size. A random-weight Phi-2 checkpoint (bf16, HF layout) is written once, tensor by
tensor; then a fresh process loads it with NF4 block linears, applies LoRA r=64 to every target, and runs one
forward+backward of 512 tokens with gradient checkpointing. Prints the bytes the base weights hold beside their
fp32 and bf16 sizes, and the peak RSS of that process against a baseline process doing the same step over a
bf16 base (plain 16-bit LoRA). Targets: QLoRA peak RSS <= 4 GB at 512 tokens; <= 8 GB at 2048 (the speed
issue's budget for a GPU, which this process's RSS stands in for on a CPU).

    python bench/bench_qlora.py [--dir=/tmp/omniphi-phi2-random] [--seq_len=512] [--r=64] [--baseline=false]
                                [--malloc_default]   # leave glibc's dynamic mmap threshold on (see child())
"""

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lora import QuantizedLinear, apply_lora, lora_parameters  # noqa: E402
from model import Phi, PhiConfig  # noqa: E402
from common import parse_config, return_freed_memory  # noqa: E402
from lora import quantizer  # noqa: E402

GB = 1e9


@dataclass
class BenchConfig:
    dir: str = "/tmp/omniphi-phi2-random"  # where the random Phi-2-size checkpoint is written once
    seq_len: int = 512  # tokens in the one measured training step
    r: int = 64  # LoRA rank
    baseline: bool = True  # also run the same step over a bf16 base
    malloc_default: bool = False  # keep glibc's default malloc thresholds (the peak then includes freed blocks glibc keeps)
    child: str = ""  # internal: "nf4" | "none" runs one measured step in this process


def write_random_checkpoint(folder, config, shard_bytes=2 * 2**30):
    """bf16 N(0, 0.02) weights, unit LayerNorms, zero biases, written shard by shard: never the whole model in memory.
    config.json goes last, so its presence means the checkpoint is complete."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {name: t.shape for name, t in Phi(config).state_dict().items()}
    total = sum(math.prod(s) * 2 for s in shapes.values())
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < total * 1.05:
        raise SystemExit(f"{folder} needs {total / GB:.1f} GB free for the bf16 checkpoint, only {free / GB:.1f} GB is")
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    generator = torch.Generator().manual_seed(0)
    for file, shard in zip(names, shards):
        tensors = {}
        for name in shard:
            if name.endswith("layernorm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            elif name.endswith(".bias"):
                tensors[name] = torch.zeros(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shapes[name], generator=generator) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(folder / (file + ".tmp")), metadata={"format": "pt"})
        os.replace(folder / (file + ".tmp"), folder / file)
        print(f"  wrote {file}", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, s in zip(names, shards) for n in s}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf_json()
    hf["torch_dtype"] = "bfloat16"
    (folder / "config.json.tmp").write_text(json.dumps(hf, indent=2))
    os.replace(folder / "config.json.tmp", folder / "config.json")


def rss(kind="VmHWM"):
    """This process's peak (VmHWM) or current (VmRSS) resident set. Not ru_maxrss: Linux carries the parent's
    high-water mark into a forked child, so a child would report at least the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(kind + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: KiB there too on most systems


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def run_step(folder, quantize, seq_len, r):
    """One QLoRA (or bf16-LoRA) training step in this process; returns sizes and memory as a dict."""
    torch.manual_seed(0)
    rss_start = rss("VmRSS")
    t0 = time.time()
    model = Phi.from_pretrained(folder, dtype=torch.bfloat16, quantize=quantizer(quantize))
    load_s, rss_loaded, load_peak = time.time() - t0, rss("VmRSS"), rss()
    apply_lora(model, r=r, alpha=16, dropout=0.05)
    model.config.gradient_checkpointing = True
    model.train()
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len + 1))
    Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM: the step's own peak
    t0 = time.time()
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    loss.backward()
    step_s = time.time() - t0
    lora = lora_parameters(model)
    assert all(p.grad is not None for p in lora)

    parts = {"block linear weights": [], "block linear biases": [], "embed_tokens": [], "lm_head": [], "LayerNorms": []}
    held = dict.fromkeys(parts, 0)
    for module in model.modules():
        if isinstance(module, QuantizedLinear):  # the weight lives in buffers, the bias is a parameter (below)
            held["block linear weights"] += tensor_bytes(module.buffers())
    for name, p in model.named_parameters():
        if ".lora_" in name:
            continue
        part = ("embed_tokens" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head")
                else "LayerNorms" if "layernorm" in name else "block linear biases" if name.endswith("bias")
                else "block linear weights")
        held[part] += p.numel() * p.element_size()
    for block in model.model.layers:  # parameter counts of the original model, whatever form the weights take now
        for m in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.dense,
                  block.mlp.fc1, block.mlp.fc2):
            parts["block linear weights"].append(m.in_features * m.out_features)
            parts["block linear biases"].append(m.out_features)
    parts["embed_tokens"] = [model.model.embed_tokens.weight.numel()]
    parts["lm_head"] = [model.lm_head.weight.numel() + model.lm_head.bias.numel()]
    parts["LayerNorms"] = [p.numel() for n, p in model.named_parameters() if "layernorm" in n]
    return {"quantize": quantize, "params": {k: sum(v) for k, v in parts.items()}, "held": held,
            "lora_params": sum(p.numel() for p in lora), "lora_bytes": tensor_bytes(lora),
            "lora_grad_bytes": tensor_bytes(p.grad for p in lora), "loss": loss.item(),
            "rss_start": rss_start, "rss_loaded": rss_loaded, "load_peak": load_peak, "step_peak": rss(),
            "rss_peak": max(load_peak, rss()), "load_s": load_s, "step_s": step_s}


def child(folder, quantize, seq_len, r, malloc_default=False):
    cmd = [sys.executable, __file__, f"--dir={folder}", f"--seq_len={seq_len}", f"--r={r}", f"--child={quantize}",
           f"--malloc_default={malloc_default}"]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    args = parse_config(BenchConfig, sys.argv[1:], doc=__doc__)
    folder = Path(args.dir)
    if args.child:
        if not args.malloc_default:
            # what train_mm.py and train_lm.py do first: glibc would otherwise raise its mmap threshold to the size
            # of each big block freed (up to 32 MB) and carve the per-call dequantized weights and activations from
            # heaps it never gives back (~1.8 GB of RSS on this step)
            return_freed_memory()
        print(json.dumps(run_step(folder, None if args.child == "none" else args.child, args.seq_len, args.r)))
        return
    if not (folder / "config.json").is_file():
        print(f"writing a random bf16 Phi-2 checkpoint to {folder} (once) ...", file=sys.stderr)
        write_random_checkpoint(folder, PhiConfig.from_preset("phi-2"))
    runs = [child(folder, "nf4", args.seq_len, args.r, args.malloc_default)]
    if args.baseline:
        runs.append(child(folder, "none", args.seq_len, args.r, args.malloc_default))
    q = runs[0]

    print(f"\n## Phi-2 base weights (random, {sum(q['params'].values()) / 1e9:.2f}B parameters)\n")
    print("| part | parameters | fp32 | bf16 | held in QLoRA run |")
    print("|---|---:|---:|---:|---:|")
    for part, n in q["params"].items():
        kind = "NF4" if part == "block linear weights" else "bf16"
        print(f"| {part} | {n / 1e6:,.1f} M | {4 * n / GB:.3f} GB | {2 * n / GB:.3f} GB | {q['held'][part] / GB:.3f} GB ({kind}) |")
    n = sum(q["params"].values())
    print(f"| **total base** | {n / 1e6:,.1f} M | {4 * n / GB:.3f} GB | {2 * n / GB:.3f} GB | {sum(q['held'].values()) / GB:.3f} GB |")
    print(f"| LoRA r={args.r} A+B (fp32) + grads | {q['lora_params'] / 1e6:,.1f} M | | | "
          f"{(q['lora_bytes'] + q['lora_grad_bytes']) / GB:.3f} GB |")

    print(f"\n## One forward+backward, batch 1 x {args.seq_len} tokens, gradient checkpointing, LoRA r={args.r} on all targets\n")
    print("| run | base weights held | RSS after load | peak while loading | peak in fwd+bwd | load | fwd+bwd | loss |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        name = "QLoRA: NF4 blocks, bf16 rest" if run["quantize"] else "baseline: bf16 base, 16-bit LoRA"
        print(f"| {name} | {sum(run['held'].values()) / GB:.2f} GB | {run['rss_loaded'] / GB:.2f} GB | "
              f"{run['load_peak'] / GB:.2f} GB | {run['step_peak'] / GB:.2f} GB | {run['load_s']:.0f} s | "
              f"{run['step_s']:.0f} s | {run['loss']:.3f} |")
    target = 4 if args.seq_len <= 512 else 8
    verdict = "met" if q["rss_peak"] <= target * GB else "MISSED"
    print(f"\nTarget QLoRA peak RSS <= {target} GB: {verdict} ({q['rss_peak'] / GB:.2f} GB, of which {q['rss_start'] / GB:.2f} GB "
          f"is the process after importing torch and bitsandbytes; glibc malloc "
          f"{'default' if args.malloc_default else 'with the trainers M_MMAP_THRESHOLD of 1 MiB'}; {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
