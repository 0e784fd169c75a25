"""Which gradients of one training step change with the thread count? The demo Phi (random weights), one batch of
64 x 24 tokens, loss and gradients at 1 and at 2 threads in one process, each compared bit for bit; then the single
operations that can differ (LayerNorm's backward, the vocabulary-long matrix product of lm_head's input gradient).

    python bench/thread_diff.py
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import parse_config  # noqa: E402
from model import Phi, PhiConfig, PRESETS  # noqa: E402


@dataclass
class ThreadDiffConfig:
    preset: str = "demo"  # the Phi preset of model.py whose training step is compared
    batch_size: int = 64  # sequences in the batch
    block_size: int = 24  # tokens per sequence


def at_threads(threads, fn):
    torch.set_num_threads(threads)
    return fn()


def main(argv=None):
    cfg = parse_config(ThreadDiffConfig, sys.argv[1:] if argv is None else argv, doc=__doc__)
    torch.manual_seed(0)
    model = Phi(PhiConfig(**PRESETS[cfg.preset]))
    idx = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.block_size))

    def step():
        model.zero_grad()
        logits, _ = model(idx)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
        loss.backward()
        return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}

    (loss1, grads1), (loss2, grads2) = at_threads(1, step), at_threads(2, step)
    print(f"loss at 1 and 2 threads: {'bit-identical' if loss1 == loss2 else f'{loss1} vs {loss2}'}")
    same = [k for k in grads1 if torch.equal(grads1[k], grads2[k])]
    print(f"gradients bit-identical: {len(same)} of {len(grads1)} ({', '.join(same) or 'none'})")
    for k in grads1:
        if k not in same:
            diff = (grads1[k] - grads2[k]).abs().max().item()
            print(f"  {k}: max difference {diff:.1e} ({diff / grads1[k].abs().max().item():.0e} of its largest)")

    rows, width = cfg.batch_size * cfg.block_size, model.config.hidden_size
    x, w, b, g = torch.randn(rows, width), torch.randn(width), torch.randn(width), torch.randn(rows, width)

    def layer_norm_backward():
        xs, ws, bs = (v.clone().requires_grad_() for v in (x, w, b))
        torch.nn.functional.layer_norm(xs, (width,), ws, bs).backward(g)
        return xs.grad, ws.grad, bs.grad

    vocab = model.config.vocab_size
    logit_grad, weight, square = torch.randn(rows, vocab), model.lm_head.weight.detach(), torch.randn(width, width)
    ops = {"LayerNorm backward (dx, dw, db)": layer_norm_backward,
           f"lm_head input gradient ({rows} x {vocab}) @ ({vocab} x {width})": lambda: (logit_grad @ weight,),
           f"a product with inner dimension {width}": lambda: (g @ square,)}
    for name, fn in ops.items():
        one, two = at_threads(1, fn), at_threads(2, fn)
        print(f"{name}: " + ", ".join("bit-identical" if torch.equal(p, q) else "differs" for p, q in zip(one, two)))


if __name__ == "__main__":
    main()
