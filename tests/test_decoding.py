"""decoding.py: the compiled decode step (one graph, the same tokens as eager decoding, a power-of-two cache), the
multiply-and-sum linears inductor makes of it on a CPU, one query's attention written out, and the NF4 and int8
layers inside it."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from decoding import CompiledDecoder, MultiplySumLinear, one_query_attention
from model import Phi, PhiConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("phi")
    Phi(PhiConfig.from_preset("tiny", vocab_size=512)).save_pretrained(path)
    return None, path


def test_compiled_decode_is_one_graph_with_identical_tokens(checkpoint, patch_compile):
    """The compiled step captures whole (fullgraph=True); the eager backend keeps the test fast, inductor runs in bench/gpu.sh."""
    patch_compile()
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    eager = ours.generate(idx, 12, temperature=0, eos_id=None, attention_mask=mask)
    decoder = CompiledDecoder(ours)
    for _ in range(2):  # the second call reuses the cache and the graph
        assert torch.equal(ours.generate(idx, 12, temperature=0, eos_id=None, attention_mask=mask, decoder=decoder), eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_one_query_attention_equals_sdpa(dtype, n_kv_head):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 1, 80).to(dtype)
    k, v = (torch.randn(2, n_kv_head, 37, 80).to(dtype) for _ in range(2))
    mask = torch.rand(2, 1, 1, 37) < 0.7
    mask[..., 0] = True
    for m in (mask, None):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(one_query_attention(q, k, v, m).float(), expected,
                                   **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))


def materializations(graphs):
    return sum(n.target is torch.ops.omniphi.materialize.default for gm in graphs for n in gm.graph.nodes)


def test_compiled_cpu_decode_step_multiplies_and_sums_under_inductor(patch_compile):
    """Inductor itself: every linear of the step becomes a multiply-and-sum over its weight, and greedy tokens
    stay those of eager decoding."""
    from torch._inductor.compile_fx import compile_fx
    graphs = patch_compile(compile_fx)
    torch.manual_seed(0)
    ours = Phi(PhiConfig.from_preset("tiny", vocab_size=300)).eval()
    idx = torch.randint(0, 300, (1, 7))
    eager = ours.generate(idx, 12, temperature=0, eos_id=None)
    decoder = CompiledDecoder(ours)
    assert torch.equal(ours.generate(idx, 12, temperature=0, eos_id=None, decoder=decoder), eager)
    assert materializations(graphs) == sum(isinstance(m, nn.Linear) for m in ours.modules())


def test_linear_multiplies_and_sums_only_for_a_few_rows_without_grad(patch_compile):
    graphs = patch_compile()
    torch.manual_seed(0)
    linear = MultiplySumLinear(64, 48)
    step = torch.compile(linear, dynamic=False)
    for shape, grad, taken in (((1, 1, 64), False, True), ((4, 64), False, True), ((5, 64), False, False),
                               ((1, 64), True, False)):
        graphs.clear()
        x = torch.randn(shape)
        with torch.set_grad_enabled(grad):
            y = step(x)
        assert materializations(graphs) == taken
        torch.testing.assert_close(y, F.linear(x, linear.weight, linear.bias))
    graphs.clear()
    with torch.no_grad():
        linear(torch.randn(1, 64))  # eager: BLAS
    assert graphs == []


def test_compiled_decode_cache_is_a_power_of_two_of_slots(patch_compile):
    patch_compile()
    torch.manual_seed(0)
    ours = Phi(PhiConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=1024)).eval()
    decoder = CompiledDecoder(ours)
    for prompt, new, slots in ((7, 12, 256), (250, 10, 512), (600, 300, 1024)):
        idx = torch.randint(0, 300, (1, prompt))
        eager = ours.generate(idx, new, temperature=0, eos_id=None)
        assert torch.equal(ours.generate(idx, new, temperature=0, eos_id=None, decoder=decoder), eager)
        assert ours.model.layers[0].self_attn.kv_cache.k.shape[2] == slots


def test_plain_forward_ignores_a_kept_cache(checkpoint, patch_compile):
    patch_compile()
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (2, 9))
    decoder = CompiledDecoder(ours)
    with torch.no_grad():
        before = ours(idx)[0]
        ours.generate(idx, 3, temperature=0, eos_id=None, decoder=decoder)  # keeps its cache
        assert torch.equal(ours(idx)[0], before)
