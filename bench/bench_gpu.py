"""
GPU benchmark for a Phi-2-size model with random weights (run by bench/gpu.sh; --smoke runs it tiny on a CPU).

Decode tokens/s at batch 1 (bf16, int8 and NF4, eager and compiled) next to the memory-bandwidth limit
(weight bytes / measured copy bandwidth) and transformers on the same weights (eager, and last its static cache
with the forward compiled); prefill tokens/s;
training MFU (bf16, seq 2048); QLoRA peak GPU memory. Writes a markdown table and JSON to --out.
"""

import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import parse_config  # noqa: E402
from decoding import CompiledDecoder, speed_up  # noqa: E402
from lora import quantizer  # noqa: E402
from model import Phi, PhiConfig  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps=3):
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def copy_bandwidth(device, nbytes):
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), 10)
    return 2 * nbytes / t  # read + write


def weight_bytes(model):
    """Bytes one decode step must read: every parameter except the embedding table (one row is read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "rope" not in n and "kv_cache" not in n)
    return total - model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()


def decode_rate(model, prompt, new, decoder=None):
    """Tokens/s of decoding alone: (time for 1 + new tokens - time for the first) / new."""
    return rate_without_prefill(lambda n: model.generate(prompt, n, temperature=0, eos_id=None, decoder=decoder), new)


def rate_without_prefill(generate, new):
    return new / (timed(lambda: generate(1 + new), 2) - timed(lambda: generate(1), 2))


def transformers_decode_rate(ckpt, dtype, device, prompt, new, **options):
    from transformers import PhiForCausalLM
    ref = PhiForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return rate_without_prefill(lambda n: ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                                       pad_token_id=0, **options), new)


@dataclass
class BenchConfig:
    out: str = os.environ.get("OUT", "out/bench-gpu")  # folder for gpu_bench.md and gpu_bench.json
    smoke: bool = False  # tiny model, any device: checks the script runs
    new: int = 256  # new tokens per decode measurement
    skip: str = ""  # comma list of sections to skip: hf,nf4,int8,train,qlora,compile


def main():
    args = parse_config(BenchConfig, sys.argv[1:], doc=__doc__)
    skip = set(filter(None, args.skip.split(",")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    config = PhiConfig.from_preset("tiny" if args.smoke else "phi-2")
    new = 16 if args.smoke else args.new
    train_seq = 128 if args.smoke else 2048
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    rows, results = [], {"device": name, "torch": torch.__version__, "preset": "tiny" if args.smoke else "phi-2"}

    def row(measure, value, note=""):
        rows.append((measure, value, note))
        results[measure] = value
        print(f"{measure}: {value} {note}", flush=True)
        write()

    def write():  # after every row, so a run cut short by its time limit still leaves what it measured
        table = [f"Phi-2-size random weights ({results['preset']}), {name}, torch {torch.__version__}", "",
                 "| measure | value | note |", "|---|---:|---|"]
        table += [f"| {m} | {v} | {n} |" for m, v, n in rows]
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write("\n".join(table) + "\n")
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(results, f, indent=2)
        return table

    bandwidth = copy_bandwidth(device, (64 if args.smoke else 2048) << 20)
    row("copy bandwidth GB/s", round(bandwidth / 1e9, 1))

    ckpt = tempfile.mkdtemp(prefix="phi2-random-")
    torch.manual_seed(0)
    with torch.device(device):
        model = Phi(config).to(dtype)
    model.save_pretrained(ckpt)
    speed_up(model.eval())
    prompt = torch.randint(0, 50000, (1, 32), device=device)

    limit = bandwidth / weight_bytes(model)
    row("bf16 decode limit tok/s", round(limit, 1), f"{weight_bytes(model) / 1e9:.2f} GB of weights per token")
    rate = decode_rate(model, prompt, new)
    row("bf16 decode tok/s, eager", round(rate, 1), f"{rate / limit:.0%} of limit")
    if "compile" not in skip:
        mode = "reduce-overhead" if device == "cuda" else "default"
        rate = decode_rate(model, prompt, new, CompiledDecoder(model, mode))
        row("bf16 decode tok/s, compiled", round(rate, 1), f"{rate / limit:.0%} of limit ({mode})")
        model.clear_cache()
    long_prompt = torch.randint(0, 50000, (1, min(1024, config.max_position_embeddings)), device=device)
    with torch.inference_mode():
        t = timed(lambda: model.hidden_states(long_prompt), 3)
    row("bf16 prefill tok/s", round(long_prompt.shape[1] / t), f"{long_prompt.shape[1]}-token prompt")

    if "hf" not in skip:
        rate = transformers_decode_rate(ckpt, dtype, device, prompt, new)
        row("transformers decode tok/s", round(rate, 1), "bf16, sdpa, eager")
    del model
    gc.collect()
    torch.cuda.empty_cache() if device == "cuda" else None

    for kind in ("nf4", "int8"):
        if kind in skip:
            continue
        q = speed_up(Phi.from_pretrained(ckpt, dtype=dtype, device=device, quantize=quantizer(kind)))
        wb = weight_bytes(q)
        rate = decode_rate(q, prompt, new)
        row(f"{kind} decode tok/s", round(rate, 1), f"{wb / 1e9:.2f} GB of weights; limit {bandwidth / wb:.0f} tok/s")
        del q
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None

    if "train" not in skip:
        torch.manual_seed(0)
        with torch.device(device):
            model = Phi(config).to(dtype)
        model.train()
        step_model = torch.compile(model) if device == "cuda" else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        batch = 1
        x = torch.randint(0, 50000, (batch, train_seq + 1), device=device)

        def train_step():
            loss = step_model(x[:, :-1], targets=x[:, 1:])[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t = timed(train_step, 3)
        tokens_per_s = batch * train_seq / t
        mfu = model.estimate_mfu(tokens_per_s, train_seq, peak) if peak else None
        row("training tok/s", round(tokens_per_s), f"bf16 weights + AdamW, seq {train_seq}, batch {batch}, compiled")
        row("training MFU", None if mfu is None else round(mfu, 3), f"peak {peak / 1e12:.0f} TFLOPs" if peak else "unknown peak")
        del model, step_model, opt
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None

    if "qlora" not in skip:
        from lora import apply_lora
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        model = Phi.from_pretrained(ckpt, dtype=dtype, device=device, quantize=quantizer("nf4"))
        model.config.gradient_checkpointing = True
        apply_lora(model, r=64, alpha=16)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x = torch.randint(0, 50000, (1, train_seq + 1), device=device)
        loss = model(x[:, :-1], targets=x[:, 1:])[1]
        loss.backward()
        opt.step()
        peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        row("QLoRA peak GPU memory GiB", None if peak_mem is None else round(peak_mem, 2),
            f"NF4 base, r=64 on all block linears, seq {train_seq}, gradient checkpointing")
        del model, opt, loss
        gc.collect()
        torch.cuda.empty_cache() if device == "cuda" else None

    for kind in ("int8", "nf4"):  # last: they only add to the rows above
        if "compile" in skip or kind in skip:
            continue
        q = Phi.from_pretrained(ckpt, dtype=dtype, device=device, quantize=quantizer(kind))
        mode = "reduce-overhead" if device == "cuda" else "default"
        try:
            decoder = CompiledDecoder(q, mode)
        except ValueError as err:  # NF4 compiles only with bitsandbytes' CPU kernel
            row(f"{kind} decode tok/s, compiled", None, str(err).split(":")[0])
            continue
        rate = decode_rate(q, prompt, new, decoder)
        row(f"{kind} decode tok/s, compiled", round(rate, 1), f"limit {bandwidth / weight_bytes(q):.0f} tok/s ({mode})")
        del q
        gc.collect()

    if "compile" not in skip and "hf" not in skip:  # transformers' own fast path: a static cache, forward compiled
        rate = transformers_decode_rate(ckpt, dtype, device, prompt, new, cache_implementation="static")
        row("transformers decode tok/s, static cache", round(rate, 1),
            "bf16, sdpa" + (", forward auto-compiled" if device == "cuda" else ""))

    print("\n" + "\n".join(write()))


if __name__ == "__main__":
    main()
