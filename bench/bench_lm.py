"""
Benchmark: our Phi against transformers.PhiForCausalLM on the same random weights, in one run.
Decode tokens/s at batch 1 (greedy, prefill excluded) in fp32, bf16 and weight-only int8 / NF4, each next to the
memory-bandwidth limit (weight bytes / measured copy bandwidth); prefill tokens/s; training tokens/s in fp32 and
under bf16 autocast (forward + backward + fused AdamW, the optimizer of train_lm.py and of transformers' Trainer),
each as a share of the FLOP/s one large matrix multiply reaches in that precision on this machine.
Each ratio comes from alternating runs of the two models (the median of each), so load on a shared machine hits
both alike.

    python bench/bench_lm.py                     # mid-sized config, CPU
    python bench/bench_lm.py --compile           # also torch.compile'd decoding and training, ours and transformers'
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_gpu import copy_bandwidth, weight_bytes  # noqa: E402
from model import Phi, PhiConfig  # noqa: E402


def seconds(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def matmul_rate(device, dtype, n=2048):
    """FLOP/s of one large square matrix multiply: the ceiling a training step's matrix multiplies can reach."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / min(alternating([lambda: a @ b], 5))


def alternating(fns, reps):
    """Median seconds of each function, run in turns after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t.append(seconds(fn))
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--train_batch", type=int, default=4)
    ap.add_argument("--train_seq", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    from transformers import PhiForCausalLM

    device, new = args.device, args.new
    config = PhiConfig.from_preset(args.preset, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50000, (1, args.prompt), device=device)
    bandwidth = copy_bandwidth(device, 512 << 20)
    big = torch.ones(128 << 20, device=device)  # 512 MB
    read_bandwidth = big.numel() * 4 / min(alternating([big.sum], 5))  # one pass that only reads, as decoding does
    del big
    decode_rows, rows = [], []

    def ours_generate(model, n, compile=None):
        return lambda: model.generate(prompt, n, temperature=0, eos_id=None, compile=compile)

    def ref_generate(model, n, compile=None):
        options = {}
        if compile:  # transformers' own compiled decoding: a static cache and its auto-compiled forward
            from transformers.generation.configuration_utils import CompileConfig
            options = dict(cache_implementation="static", compile_config=CompileConfig(mode=compile, fullgraph=True))
            options["compile_config"]._compile_all_devices = True  # it compiles only on accelerators otherwise
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                      **options)

    with tempfile.TemporaryDirectory() as tmp:
        Phi(config).save_pretrained(tmp)
        load_ref = lambda dtype: PhiForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
        full = Phi.from_pretrained(tmp, device=device)
        with torch.inference_mode():
            full_logits = full(prompt)[0].float()
        full_tokens = full.generate(prompt, 32, temperature=0, eos_id=None)[0, args.prompt:]

        def decode_row(name, ours, ref, ref_name, compile=None):
            with torch.inference_mode():
                err = ((ours(prompt)[0].float() - full_logits).abs().max() / full_logits.abs().max()).item()
            tokens = ours.generate(prompt, 32, temperature=0, eos_id=None, compile=compile)[0, args.prompt:]
            same = next((i for i, (a, b) in enumerate(zip(tokens, full_tokens)) if a != b), 32)
            # a decode rate without the prefill: (time for 1 + new tokens - time for the first) / new
            ours_1, ours_n, ref_1, ref_n = alternating(
                [ours_generate(ours, 1, compile), ours_generate(ours, 1 + new, compile),
                 ref_generate(ref, 1, compile), ref_generate(ref, 1 + new, compile)], args.reps)
            rate, ref_rate = new / (ours_n - ours_1), new / (ref_n - ref_1)
            decode_rows.append((name, rate, rate / (bandwidth / weight_bytes(ours)), ref_name, ref_rate, err, same))

        mode = "reduce-overhead" if device == "cuda" else "default"
        ref = load_ref(torch.float32)
        decode_row("fp32", full, ref, "fp32")
        if args.compile:
            decode_row("fp32, compiled step", full, ref, "fp32, static cache, compiled", compile=mode)
            full.clear_cache()
        with torch.inference_mode():
            t_ours, t_ref = alternating([lambda: full(prompt), lambda: ref(prompt)], args.reps + 2)
        rows.append(("prefill tokens/s (fp32)", args.prompt / t_ours, args.prompt / t_ref, ""))
        ref_fp32 = ref

        ref = load_ref(torch.bfloat16)
        for kind in (None, "int8", "nf4"):
            model = Phi.from_pretrained(tmp, dtype=torch.bfloat16, device=device, quantize=kind)
            name = f"{kind} weights, bf16 compute" if kind else "bf16"
            decode_row(name, model, ref, "bf16")
            if args.compile and (kind != "nf4" or device == "cpu"):  # NF4 compiles with bitsandbytes' CPU kernel
                decode_row(f"{name}, compiled step", model, ref, "bf16, static cache, compiled", compile=mode)
            del model
        del ref

    x = torch.randint(0, 50000, (args.train_batch, args.train_seq + 1), device=device)
    tokens = args.train_batch * args.train_seq

    def train_step(model, forward, autocast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model.train()

        def step():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours_loss = lambda m: m(x[:, :-1], targets=x[:, 1:])[1]
    ref_loss = lambda m: m(x[:, :-1], labels=x[:, :-1]).loss
    flops = full.flops_per_token(args.train_seq)
    for autocast in (False, True):
        peak = matmul_rate(device, torch.bfloat16 if autocast else torch.float32)
        of_peak = lambda t: f"{tokens / t * flops / peak:.0%}"
        t_ours, t_ref = alternating([train_step(full, ours_loss, autocast), train_step(ref_fp32, ref_loss, autocast)],
                                    args.reps)
        name = "bf16 autocast" if autocast else "fp32"
        rows.append((f"training tokens/s ({name}, fused AdamW)", tokens / t_ours, tokens / t_ref,
                     f"{of_peak(t_ours)} / {of_peak(t_ref)} of {peak / 1e9:.0f} GFLOP/s"))
        if args.compile:
            t_c, t_ref_c = alternating([train_step(torch.compile(full), ours_loss, autocast),
                                        train_step(torch.compile(ref_fp32), ref_loss, autocast)], args.reps)
            rows.append((f"training tokens/s ({name}), both compiled", tokens / t_c, tokens / t_ref_c,
                         f"{of_peak(t_c)} / {of_peak(t_ref_c)}"))

    n = sum(p.numel() for p in full.parameters())
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nPhi '{args.preset}' x {args.layers} layers ({n / 1e6:.0f}M params), {dev}, torch {torch.__version__}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s (read-only: {read_bandwidth / 1e9:.1f} GB/s); prompt {args.prompt}, "
          f"{new} new tokens\n")
    print("| decode, batch 1 | omniphi tokens/s | of bandwidth limit | transformers tokens/s | ratio "
          "| max logit error vs fp32 | greedy tokens equal to fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rate, of_limit, ref_name, ref_rate, err, same in decode_rows:
        print(f"| {name} | {rate:,.1f} | {of_limit:.0%} | {ref_rate:,.1f} ({ref_name}) | {rate / ref_rate:.2f}x "
              f"| {err:.3f} | first {same} of 32 |")
    print("\n| measure | omniphi | transformers | ratio | FLOP/s of the matmul rate (omniphi / transformers) |")
    print("|---|---:|---:|---:|---:|")
    for name, a, b, of_peak in rows:
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x | {of_peak} |")


if __name__ == "__main__":
    main()
