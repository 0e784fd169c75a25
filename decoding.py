"""
Fast decoding for model.py's Phi, applied from outside the model (as gpt-fast keeps its model plain):

- `speed_up(model)`: one query's attention written out on a CPU (SDPA's CPU kernel is several times slower for a
  single bf16 query, and under torch.compile);
- `CompiledDecoder(model)`: the one-token decode step under torch.compile over a static KV cache, with every linear
  of the model computing x @ W.T as (W * x).sum(-1) inside the graph on a CPU, which inductor turns into one
  vectorised pass over W that reads memory faster than BLAS's matrix-vector kernel (bench/bench_lm.py).

    decoder = CompiledDecoder(model)                     # model.generate(..., decoder=decoder)

Both change how the model computes, never what: the same weights, the same state_dict, the same tokens up to
rounding (tested against eager decoding).
"""

import math

import torch
import torch.nn as nn

from lora import Int8Linear, NF4Linear
from model import attention

# materialize(x): a copy that torch.compile cannot see into, so what computed x is not fused into its consumer.
# A plain library op (4 us a call) rather than torch.library.custom_op (13 us); defined once per process.
if not hasattr(torch.ops.omniphi, "materialize"):
    _library = torch.library.Library("omniphi", "FRAGMENT")
    _library.define("materialize(Tensor x) -> Tensor")
    _library.impl("materialize", lambda x: x.clone(), "CompositeExplicitAutograd")
materialize = torch.ops.omniphi.materialize.default


def one_query_attention(q, k, v, mask=None):
    """Attention of one query position (B, heads, 1, head_dim), written out: matmul, fp32 softmax, matmul. Query heads
    share key heads in groups."""
    B, n_head, _, head_dim = q.shape
    n_kv_head = k.shape[1]
    scores = (q.view(B, n_kv_head, n_head // n_kv_head, head_dim) @ k.transpose(-1, -2)).float() / math.sqrt(head_dim)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, n_head, 1, head_dim)


def cpu_attention(q, k, v, mask=None, dropout_p=0.0):
    """model.attention, with one query on a CPU written out."""
    if q.shape[2] == 1 and q.device.type == "cpu" and dropout_p == 0.0:
        return one_query_attention(q, k, v, mask)
    return attention(q, k, v, mask, dropout_p)


def speed_up(model):
    """Inference-speed attention for every block of a Phi, in place; returns the model."""
    for block in model.model.layers:
        block.self_attn.attend = cpu_attention
    return model


def multiply_sum_is_faster(x):
    """True inside torch.compile, on a CPU, without autograd, for at most 4 rows: the compiled decode step."""
    return torch.compiler.is_compiling() and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and x.shape[:-1].numel() <= 4


def multiply_sum(x, weight):
    """x @ weight.T in fp32 as a multiply and a sum. x is materialized first (in fp32, so it is not converted
    again for every row): fused in, whatever computed x (a LayerNorm, a GELU) would be recomputed for every weight
    element."""
    return (weight * materialize(x.float()).unsqueeze(-2)).sum(-1)


class MultiplySumLinear(nn.Linear):
    """nn.Linear that takes the multiply-and-sum form where that is faster."""

    def forward(self, x):
        if multiply_sum_is_faster(x):
            out = multiply_sum(x, self.weight)
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        return super().forward(x)


class MultiplySumInt8Linear(Int8Linear):
    """Int8Linear that reads its int8 weight once, converting as it goes, where the multiply-and-sum is faster."""

    def forward(self, x):
        if multiply_sum_is_faster(x):
            out = multiply_sum(x, self.weight_int8) * self.weight_scale
            return (out if self.bias is None else out + self.bias).to(x.dtype)
        return super().forward(x)


FASTER = {nn.Linear: MultiplySumLinear, Int8Linear: MultiplySumInt8Linear}


def use_multiply_sum(module):
    """Every nn.Linear and Int8Linear in module (itself included) takes the multiply-and-sum form where it is faster:
    the same modules and tensors, with the forward of their subclass here. Returns module."""
    for m in module.modules():
        if type(m) in FASTER:
            m.__class__ = FASTER[type(m)]
    return module


class CompiledDecoder:
    """model.decode_step under torch.compile (one graph per cache size: shapes are static because the cache is
    preallocated). mode="reduce-overhead" adds CUDA graphs on a GPU. The cache is sized to a power of two of slots
    (at least 256, at most the context), so a few graphs serve every length and attention reads no more than twice
    the slots in use. NF4 weights compile only through bitsandbytes' CPU kernel (bf16 compute, AVX512-BF16)."""

    def __init__(self, model, mode="default"):
        nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
        if not all(m.ready_for_compiled_decoding() for m in nf4):
            raise ValueError("compiled decoding supports NF4 weights only through bitsandbytes' CPU kernel: bf16 "
                             "compute on a CPU with AVX512-BF16 (elsewhere its calls break the graph); decode eagerly "
                             "or use int8")
        use_multiply_sum(model)
        speed_up(model)
        self.model, self.mode = model, mode
        self.step = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)

    def cache_len(self, needed):
        return min(self.model.config.max_position_embeddings, max(256, 1 << (needed - 1).bit_length()))
