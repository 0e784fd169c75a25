"""
Images per second of omniphi's CLIP vision tower against transformers' CLIPVisionModel on the same random
weights, on this machine's CPU (or GPU with --device=cuda). Prints a markdown table.

    python bench/bench_clip.py [--preset=clip-vit-base-patch16 --batch_size=8 --reps=5 --dtype=float32]
"""

import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clip_encoder import CLIPVision, CLIPVisionConfig, resolve_dtype  # noqa: E402
from common import parse_config  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = "clip-vit-base-patch16"  # clip_encoder preset of the random tower
    batch_size: int = 8  # images per forward
    warmup: int = 1  # untimed runs first
    reps: int = 5  # timed runs of each, interleaved; the best counts
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N


def sync(x):
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def race(fn_a, fn_b, x, warmup, reps):
    """Seconds per call of each, best of `reps`, the two interleaved so background load hits both alike."""
    for _ in range(warmup):
        fn_a(x), fn_b(x)
    best = [float("inf"), float("inf")]
    for _ in range(reps):
        for i, fn in enumerate((fn_a, fn_b)):
            sync(x)
            t0 = time.perf_counter()
            fn(x)
            sync(x)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main():
    args = vars(parse_config(BenchConfig, sys.argv[1:], doc=__doc__))
    from transformers import CLIPVisionModel  # the baseline only

    dtype, device = resolve_dtype(args["dtype"]), args["device"]
    config = CLIPVisionConfig.from_preset(args["preset"])
    torch.manual_seed(0)
    ours = CLIPVision(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        ours = CLIPVision.from_pretrained(tmp, dtype=dtype, device=device)
        theirs = CLIPVisionModel.from_pretrained(tmp, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    x = torch.randn(args["batch_size"], 3, config.image_size, config.image_size, device=device, dtype=dtype)
    B = args["batch_size"]
    layers = config.num_hidden_layers
    rows = []
    with torch.inference_mode():
        full_err = (ours(x)[0] - theirs(pixel_values=x).last_hidden_state).abs().max().item()
        cases = [
            ("full forward (last_hidden_state)", lambda x: ours(x), lambda x: theirs(pixel_values=x)),
            ("LLaVA features (hidden_states[-2])", lambda x: ours.features(x, layer=-2),
             lambda x: theirs(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]),
        ]
        for name, fn_ours, fn_theirs in cases:
            t_theirs, t_ours = race(fn_theirs, fn_ours, x, args["warmup"], args["reps"])
            rows.append((name, B / t_theirs, B / t_ours, t_theirs / t_ours))
    print(f"\nCLIP vision tower, preset {args['preset']} ({layers} layers, {config.hidden_size} wide, "
          f"{config.image_size}px/{config.patch_size}), batch {B}, {args['dtype']}, {device}, "
          f"{torch.get_num_threads()} threads, best of {args['reps']}; max |diff| {full_err:.1e}\n")
    print("| workload | transformers img/s | omniphi img/s | ratio |")
    print("|---|---:|---:|---:|")
    for name, a, b, r in rows:
        print(f"| {name} | {a:.2f} | {b:.2f} | {r:.2f}x |")


if __name__ == "__main__":
    main()
