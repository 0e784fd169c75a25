"""
Benchmark: our Phi against transformers.PhiForCausalLM on the same random weights, in one run, at several sizes.
Decode tokens/s at batch 1 (greedy, the prefill left out: (time for 1 + new tokens - time for 1) / new), eager and
compiled (decoding.CompiledDecoder), in fp32 and bf16, and with weight-only int8 / NF4 weights, each next to the
limit the read bandwidth sets (weight bytes read per token / bytes per second one pass over 512 MB reads), against
transformers' best decode at the same precision: the faster of its eager generate and its static cache with the
forward compiled (its own compiled decoding). Each ratio is the median of runs that alternate the two models, so
load on a shared machine hits both alike. With --train, the training rows of the 121M model as well.

    python bench/bench_lm.py                                   # the three sizes below
    python bench/bench_lm.py --sizes=small --train             # + training tokens/s, fp32 and bf16 autocast

Sizes: 8x512 (8 layers, 512 wide, 8 heads, rotary 0.5, vocab 51,200, fp32), small (Phi 'small' proportions, 6 layers,
768 wide, 121M parameters, fp32 and bf16) and phi-2 (Phi-2's size, bf16, int8 and NF4 weights).
"""

import os
import statistics
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

SIZES = {
    "8x512": (dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=8, partial_rotary_factor=0.5, max_position_embeddings=2048), ("fp32",)),
    "small": (dict(PhiConfig.from_preset("small").__dict__, num_hidden_layers=6), ("fp32", "bf16")),
    "phi-2": (dict(), ("bf16", "int8", "nf4")),
}


@dataclass
class BenchConfig:
    sizes: str = "8x512,small,phi-2"  # comma-separated names from SIZES
    prompt: int = 32  # prompt tokens
    new: int = 128  # new tokens per decode measurement (phi-2: new_large)
    new_large: int = 16  # new tokens at Phi-2 size, where a token takes a large share of a second
    reps: int = 3  # alternating runs per measurement; the median counts
    compile: bool = True  # also the compiled rows (ours and transformers')
    train: bool = False  # training tokens/s of the 121M model, fp32 and bf16 autocast, eager and compiled
    threads: int = 0  # torch threads; 0: torch's default


def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternating(fns, reps):
    """Median seconds of each function, run in turns after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for t, fn in zip(times, fns):
            t.append(seconds(fn))
    return [statistics.median(t) for t in times]


def read_bandwidth():
    big = torch.ones(128 << 20)  # 512 MB, read once by a sum, as decoding reads its weights
    return big.numel() * 4 / min(alternating([big.sum], 5))


def weight_bytes(model):
    """Bytes one decode step reads: every parameter and quantized buffer except the embedding table (one row)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "rope" not in n and "kv_cache" not in n)
    return total - model.model.embed_tokens.weight.numel() * model.model.embed_tokens.weight.element_size()


def ours_generate(model, prompt, n, decoder):
    return lambda: model.generate(prompt, n, temperature=0, eos_id=None, decoder=decoder)


def ref_generate(model, prompt, n, compiled):
    options = {}
    if compiled:  # transformers' own compiled decoding: a static cache and its auto-compiled forward
        from transformers.generation.configuration_utils import CompileConfig
        options = dict(cache_implementation="static", compile_config=CompileConfig(fullgraph=True))
        options["compile_config"]._compile_all_devices = True  # it compiles only on accelerators otherwise
    return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  **options)


def decode_rates(ours, ref, prompt, new, reps, compile):
    """{row: (ours tokens/s, transformers' best tokens/s, which of its modes that was)} for eager and compiled (unless
    the compiled step refuses these weights on this CPU: NF4 without AVX512-BF16)."""
    try:
        decoder = CompiledDecoder(ours) if compile else None
    except ValueError as err:
        print(f"  no compiled row: {err}", flush=True)
        decoder, compile = None, False
    fns = [ours_generate(ours, prompt, 1, None), ours_generate(ours, prompt, 1 + new, None),
           ref_generate(ref, prompt, 1, False), ref_generate(ref, prompt, 1 + new, False)]
    if compile:
        fns += [ours_generate(ours, prompt, 1, decoder), ours_generate(ours, prompt, 1 + new, decoder),
                ref_generate(ref, prompt, 1, True), ref_generate(ref, prompt, 1 + new, True)]
    t = alternating(fns, reps)
    rate = [new / (t[i + 1] - t[i]) for i in range(0, len(t), 2)]
    out = {"eager": (rate[0], rate[1], "eager")}
    if compile:
        best = max((rate[1], "eager"), (rate[3], "static cache, compiled"))
        out["compiled"] = (rate[2], best[0], best[1])
    return out


def main():
    args = parse_config(BenchConfig, sys.argv[1:], doc=__doc__)
    from transformers import PhiForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = read_bandwidth()
    torch.manual_seed(0)
    rows = []
    for size in filter(None, args.sizes.split(",")):
        overrides, kinds = SIZES[size]
        config = PhiConfig(**{k: v for k, v in overrides.items() if k != "gradient_checkpointing"})
        new = args.new_large if size == "phi-2" else args.new
        prompt = torch.randint(0, 50000, (1, args.prompt))
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            with torch.device("meta" if size == "phi-2" else "cpu"):
                shell = Phi(config)
            if size == "phi-2":  # random weights without an fp32 copy of 2.8B parameters
                shell = shell.to_empty(device="cpu").to(torch.bfloat16)
                with torch.no_grad():
                    for p in shell.parameters():
                        p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
                    for n, p in shell.named_parameters():
                        if "layernorm" in n and n.endswith("weight"):
                            p.fill_(1.0)
            shell.save_pretrained(tmp)
            del shell
            for kind in kinds:
                dtype = torch.float32 if kind == "fp32" else torch.bfloat16
                ours = speed_up(Phi.from_pretrained(tmp, dtype=dtype, quantize=quantizer(kind if kind in ("int8", "nf4") else None)))
                ref = PhiForCausalLM.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").eval()
                limit = bandwidth / weight_bytes(ours)
                for mode, (rate, ref_rate, ref_mode) in decode_rates(ours, ref, prompt, new, args.reps,
                                                                     args.compile).items():
                    rows.append((size, kind, mode, rate, rate / limit, ref_rate, ref_mode, rate / ref_rate))
                    print(f"{size} {kind} {mode}: {rate:.1f} tokens/s ({rate / limit:.0%} of the limit), "
                          f"transformers {ref_rate:.1f} ({ref_mode}): {rate / ref_rate:.2f}x", flush=True)
                del ours, ref
    dev = f"CPU, {torch.get_num_threads()} threads"
    print(f"\n{dev}, torch {torch.__version__}; read bandwidth {bandwidth / 1e9:.1f} GB/s (one sum over 512 MB); "
          f"prompt {args.prompt}, {args.new} new tokens ({args.new_large} at phi-2), median of {args.reps} alternating runs\n")
    print("| size | weights | decode | omniphi tokens/s | of the read-bandwidth limit | transformers' best tokens/s "
          "| ratio |")
    print("|---|---|---|---:|---:|---:|---:|")
    for size, kind, mode, rate, of_limit, ref_rate, ref_mode, ratio in rows:
        print(f"| {size} | {kind} | {mode} | {rate:,.1f} | {of_limit:.0%} | {ref_rate:,.1f} ({ref_mode}) | "
              f"{ratio:.2f}x |")
    if args.train:
        train_rows(args)


def train_rows(args):
    """Training tokens/s of the 121M model (4 x 256 tokens, fused AdamW), ours against transformers."""
    from transformers import PhiForCausalLM
    config = PhiConfig.from_preset("small", num_hidden_layers=6)
    x = torch.randint(0, 50000, (4, 257))
    with tempfile.TemporaryDirectory() as tmp:
        Phi(config).save_pretrained(tmp)
        ours, ref = Phi.from_pretrained(tmp), PhiForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")

    def step(model, loss_of, autocast):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        model.train()

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = loss_of(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run
    ours_loss = lambda m: m(x[:, :-1], targets=x[:, 1:])[1]
    ref_loss = lambda m: m(x[:, :-1], labels=x[:, :-1]).loss
    print("\n| training, 121M, 4 x 256 tokens | omniphi tokens/s | transformers tokens/s | ratio |\n|---|---:|---:|---:|")
    for autocast in (False, True):
        for compiled in (False, True):
            a, b = (torch.compile(m) if compiled else m for m in (ours, ref))
            t_ours, t_ref = alternating([step(a, ours_loss, autocast), step(b, ref_loss, autocast)], args.reps)
            name = ("bf16 autocast" if autocast else "fp32") + (", both compiled" if compiled else "")
            print(f"| {name} | {1024 / t_ours:,.1f} | {1024 / t_ref:,.1f} | {t_ref / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
