"""CUDA-only checks, run by bench/gpu.sh on a lent GPU: bf16 parity, compiled decode with CUDA graphs, NF4 (and
bitsandbytes' fused inference kernel) and int8 on CUDA."""

import pytest
import torch

from decoding import CompiledDecoder
from lora import quantizer
from model import Phi, PhiConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these)")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi")
    Phi(PhiConfig.from_preset("tiny", vocab_size=1024)).save_pretrained(path)
    return path


def test_bf16_cuda_matches_transformers(checkpoint):
    from transformers import PhiForCausalLM
    ours = Phi.from_pretrained(checkpoint, dtype="bfloat16", device="cuda")
    ref = PhiForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    idx = torch.randint(0, 1024, (2, 64), device="cuda")
    with torch.no_grad():
        assert (ours(idx)[0].float() - ref(idx).logits.float()).abs().max() < 0.05


def test_compiled_cuda_graph_decode_matches_eager(checkpoint):
    ours = Phi.from_pretrained(checkpoint, dtype="bfloat16", device="cuda")
    idx = torch.randint(0, 1024, (1, 16), device="cuda")
    eager = ours.generate(idx, 32, temperature=0, eos_id=None)
    decoder = CompiledDecoder(ours, "reduce-overhead")
    for _ in range(2):
        assert torch.equal(ours.generate(idx, 32, temperature=0, eos_id=None, decoder=decoder), eager)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_cuda_close_to_bf16(checkpoint, kind):
    full = Phi.from_pretrained(checkpoint, dtype="bfloat16", device="cuda")
    quant = Phi.from_pretrained(checkpoint, dtype="bfloat16", device="cuda", quantize=quantizer(kind))
    idx = torch.randint(0, 1024, (1, 32), device="cuda")
    with torch.no_grad():
        a, b = full(idx)[0].float(), quant(idx)[0].float()
    assert (a - b).abs().max() / a.abs().max() < 0.2


def test_nf4_fused_kernel_on_cuda_matches_dequantized():
    import torch.nn as nn

    from lora import quantize_linear
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(2560, 1024, dtype=torch.bfloat16), "nf4").cuda()
    w = q.dequantized_weight(torch.float32)
    for rows in (1, 7, 300):  # bitsandbytes' fused kernel for few rows, dequantize + matmul for many
        x = torch.randn(rows, 2560, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = q(x)
        expected = x.float() @ w.T + q.bias.float()
        assert y.dtype == torch.bfloat16 and ((y.float() - expected).norm() / expected.norm()).item() < 0.01
