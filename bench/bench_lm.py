"""
Benchmark: our Phi against transformers.PhiForCausalLM on the same random weights, in one run.
Prefill tokens/s, decode tokens/s (batch 1, greedy), training tokens/s (forward + backward + AdamW).

    python bench/bench_lm.py                     # mid-sized config, CPU
    python bench/bench_lm.py --compile           # also our torch.compile'd decode step and training step
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from model import Phi, PhiConfig  # noqa: E402


def timed(fn, reps):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--train_batch", type=int, default=4)
    ap.add_argument("--train_seq", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--quant", action="store_true", help="also NF4 and int8 weight-only models: speed and error")
    args = ap.parse_args()
    from transformers import PhiForCausalLM

    dtype = getattr(torch, args.dtype)
    config = PhiConfig.from_preset(args.preset, num_hidden_layers=args.layers)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50000, (1, args.prompt), device=args.device)
    rows, quant_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        Phi(config).save_pretrained(tmp)
        ours = Phi.from_pretrained(tmp, dtype=dtype, device=args.device)
        ref = PhiForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(args.device).eval()
        if args.quant:
            with torch.inference_mode():
                full_logits = ours(prompt)[0].float()
            full_tokens = ours.generate(prompt, 32, temperature=0, eos_id=None)[0, args.prompt:]
            for kind in ("nf4", "int8"):
                q = Phi.from_pretrained(tmp, dtype=dtype, device=args.device, quantize=kind)
                with torch.inference_mode():
                    err = ((q(prompt)[0].float() - full_logits).abs().max() / full_logits.abs().max()).item()
                tokens = q.generate(prompt, 32, temperature=0, eos_id=None)[0, args.prompt:]
                first_diff = next((i for i, (a, b) in enumerate(zip(tokens, full_tokens)) if a != b), 32)
                rate = args.new / timed(lambda: q.generate(prompt, args.new, temperature=0, eos_id=None), 1)
                quant_rows.append((kind, rate, err, first_diff))
                del q

    with torch.inference_mode():
        t_ours = timed(lambda: ours(prompt), 5)
        t_ref = timed(lambda: ref(prompt), 5)
    rows.append(("prefill tokens/s", args.prompt / t_ours, args.prompt / t_ref))

    gen = dict(max_new_tokens=args.new)
    t_ours = timed(lambda: ours.generate(prompt, args.new, temperature=0, eos_id=None), 2)
    t_ref = timed(lambda: ref.generate(prompt, do_sample=False, min_new_tokens=args.new, pad_token_id=0, **gen), 2)
    rows.append(("decode tokens/s (batch 1)", args.new / t_ours, args.new / t_ref))
    if args.compile:
        mode = "reduce-overhead" if args.device == "cuda" else "default"
        run = lambda: ours.generate(prompt, args.new, temperature=0, eos_id=None, compile=mode)
        t_c = timed(run, 2)
        rows.append(("decode tokens/s, compiled", args.new / t_c, args.new / t_ref))

    x = torch.randint(0, 50000, (args.train_batch, args.train_seq + 1), device=args.device)
    tokens = args.train_batch * args.train_seq

    def train_step(model, forward):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
        model.train()

        def step():
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
                loss = forward(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours.float() if args.device == "cpu" else None
    ref.float() if args.device == "cpu" else None
    ours_step = train_step(ours, lambda m: m(x[:, :-1], targets=x[:, 1:])[1])
    ref_step = train_step(ref, lambda m: m(x[:, :-1], labels=x[:, :-1]).loss)
    t_ours, t_ref = timed(ours_step, 3), timed(ref_step, 3)
    rows.append(("training tokens/s", tokens / t_ours, tokens / t_ref))
    if args.compile:
        compiled = torch.compile(ours)
        t_c = timed(train_step(compiled, lambda m: m(x[:, :-1], targets=x[:, 1:])[1]), 3)
        rows.append(("training tokens/s, compiled", tokens / t_c, tokens / t_ref))

    n = sum(p.numel() for p in ours.parameters())
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nPhi '{args.preset}' x {args.layers} layers ({n / 1e6:.0f}M params), {args.dtype}, {dev}, torch {torch.__version__}\n")
    print("| measure | omniphi | transformers | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b in rows:
        print(f"| {name} | {a:,.1f} | {b:,.1f} | {a / b:.2f}x |")
    if quant_rows:
        print("\n| weight-only quantization | decode tokens/s | max logit error (relative) | greedy tokens equal to full precision |")
        print("|---|---:|---:|---:|")
        for kind, rate, err, same in quant_rows:
            print(f"| {kind} | {rate:,.1f} | {err:.3f} | first {same} of 32 |")


if __name__ == "__main__":
    main()
