"""LoRA / QLoRA: quantized linears against bitsandbytes, adapters against peft (both directions), merge,
gradients (only LoRA trains, checkpointing changes nothing), a QLoRA loss that falls, and bad input."""

import json

import bitsandbytes.functional as bnbF
import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PhiConfig as HFPhiConfig
from transformers import PhiForCausalLM

from lora import (Int8Linear, LoRALinear, NF4Linear, QuantizedLinear, apply_lora, load_adapter, lora_parameters,
                  make_optimizer, merge_lora, quantize_linear, quantizer, save_adapter)
from decoding import CompiledDecoder, use_multiply_sum
from model import Phi, PhiConfig

VOCAB = 256


def make_hf(seed=0, hidden_size=160):
    torch.manual_seed(seed)
    config = HFPhiConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=2, partial_rotary_factor=0.4, max_position_embeddings=64,
                         initializer_range=0.1, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi")
    make_hf().save_pretrained(path)
    return path


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def perturb_lora(model, seed=1, scale=0.1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn_like(p) * scale)


def train_steps(model, idx, steps=3, lr=0.5):
    model.train()
    optimizer = torch.optim.SGD(lora_parameters(model), lr=lr)
    for _ in range(steps):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# ---- quantized linears --------------------------------------------------------------------------------

def nf4_reference(weight):
    """bitsandbytes' own quantization of the 2-D weight, decoded by hand: code[nibble] * (8-bit absmax decoded)."""
    packed, state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    nibbles = torch.stack((packed.view(-1) >> 4, packed.view(-1) & 15), dim=-1).view(-1)[:weight.numel()]
    values = state.code[nibbles.long()] * absmax.repeat_interleave(64)[:weight.numel()]
    return packed, values.view(weight.shape)


@pytest.mark.parametrize("shape", [(256, 128), (320, 160), (33, 30)])
def test_nf4_matches_bitsandbytes(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    q = quantize_linear(linear, "nf4")
    packed, expected = nf4_reference(linear.weight.detach())
    assert torch.equal(q.weight_nf4.view(-1), packed.view(-1))  # the very bytes bitsandbytes produces
    assert torch.equal(q.dequantized_weight(), expected)
    if shape[1] % 64 == 0:  # where bitsandbytes' CPU dequantize kernel is right, it agrees exactly too
        packed, state = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(q.dequantized_weight(), bnbF.dequantize_4bit(packed, state))
    # NF4 on Gaussian-like weights: ~0.09 relative error (16 levels, absmax blocks of 64)
    assert 0.06 < relative_error(q.dequantized_weight(), linear.weight) < 0.12
    n, blocks = linear.weight.numel(), -(-linear.weight.numel() // 64)
    # 4 bits per weight + one byte per block scale + fp32 per 256 scales, code books, offset, fp32 bias
    assert q.nbytes == -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4 * 16 + 4 + 4 * linear.bias.numel()


def test_int8_error_is_small():
    torch.manual_seed(0)
    linear = nn.Linear(160, 320)
    q = quantize_linear(linear, "int8")
    w = q.dequantized_weight()
    assert ((w - linear.weight).abs() <= q.weight_scale[:, None] / 2 + 1e-7).all()  # round to nearest step
    assert relative_error(w, linear.weight) < 0.01
    assert q.weight_int8.dtype == torch.int8 and q.weight_int8.abs().max() == 127


def test_int8_decodes_with_the_fused_kernel_on_cpu_in_bf16(monkeypatch):
    # up to 32 rows of bf16 without grad take torch's int8 x bf16 kernel; more rows, fp32 or grad dequantize
    calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(a[0].shape) or kernel(*a))
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(256, 96), "int8")
    w = q.dequantized_weight(torch.float32)
    for shape, fused in (((1, 1, 256), True), ((4, 8, 256), True), ((33, 256), False)):
        calls.clear()
        x = torch.randn(shape).bfloat16()
        with torch.no_grad():
            y = q(x)
        assert calls == ([(x.numel() // 256, 256)] if fused else [])
        assert y.shape == (*shape[:-1], 96) and y.dtype == torch.bfloat16
        assert relative_error(y.float(), x.float() @ w.T + q.bias) < 0.01  # bf16 rounding of the output
    calls.clear()
    q(torch.randn(1, 256))  # fp32
    q(torch.randn(1, 256).bfloat16().requires_grad_())
    assert calls == []


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="bitsandbytes' NF4 CPU kernel needs AVX512-BF16")
def test_nf4_infers_with_bitsandbytes_cpu_kernel_and_gives_back_its_layout():
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = quantize_linear(linear, "nf4")
    standard, w = q.weight_nf4.clone(), q.dequantized_weight(torch.float32)
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        y = q(x.bfloat16())  # bf16 without autograd: the kernel, over the reordered codes
    assert q.cpu_layout and not torch.equal(q.weight_nf4, standard)
    packed, state = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = bnbF._convert_weight_packed_for_cpu(packed, state)  # bitsandbytes' own reordering agrees
    assert torch.equal(q.weight_nf4.view(-1), packed.view(-1)) and torch.equal(q.cpu_absmax, state.absmax)
    assert y.dtype == torch.bfloat16 and relative_error(y, x @ w.T + linear.bias) < 0.01
    with torch.no_grad():
        assert torch.equal(q(x.bfloat16()), y)  # stays reordered while inferring
    for give_back in (lambda: q(x.requires_grad_()).sum().backward(), q.state_dict, lambda: q.to("cpu"),
                      lambda: q.dequantized_weight()):
        with torch.no_grad():
            q(x.detach().bfloat16())
        give_back()  # training, saving, moving and merging see bitsandbytes' layout, exactly as it was
        assert not q.cpu_layout and torch.equal(q.weight_nf4, standard) and q.cpu_absmax is None
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.T + linear.bias, rtol=0, atol=1e-5)  # fp32 keeps the exact path
    assert not q.cpu_layout


@pytest.mark.skipif(not bnbF.has_avx512bf16(), reason="bitsandbytes' NF4 CPU kernel needs AVX512-BF16")
def test_nf4_compiled_decode_step_calls_the_cpu_kernel_under_inductor(tmp_path, patch_compile):
    from torch._inductor.compile_fx import compile_fx
    graphs = patch_compile(compile_fx)
    torch.manual_seed(0)
    config = PhiConfig.from_preset("tiny", hidden_size=128, intermediate_size=256, vocab_size=VOCAB,
                                   partial_rotary_factor=0.5)
    Phi(config).save_pretrained(tmp_path)
    model = Phi.from_pretrained(tmp_path, dtype=torch.bfloat16, quantize=quantizer("nf4"))
    prompt, tokens = torch.randint(0, VOCAB, (1, 6)), torch.randint(0, VOCAB, (4,))

    def teacher_forced(step):  # the logits of four cached steps over the same tokens
        with torch.inference_mode():
            model.setup_cache(1, 16)
            key_mask = torch.zeros(1, 16, dtype=torch.bool)
            key_mask[:, :6] = True
            model.hidden_states(prompt, position_ids=torch.arange(6)[None], attention_mask=key_mask,
                                cache_slots=torch.arange(6))
            logits = []
            for i, token in enumerate(tokens):
                key_mask[:, 6 + i] = True
                logits.append(step(token.view(1, 1), torch.tensor([[6 + i]]), torch.tensor([6 + i]), key_mask).clone())
            return torch.cat(logits)
    eager = teacher_forced(model.decode_step)
    compiled = teacher_forced(CompiledDecoder(model).step)
    kernel_calls = sum(n.target is torch.ops.bitsandbytes.gemv_4bit.default for gm in graphs for n in gm.graph.nodes)
    assert kernel_calls == sum(isinstance(m, NF4Linear) for m in model.modules()) == 12
    assert relative_error(compiled, eager) < 0.01  # bf16 (0.005 here): the compiled lm_head sums in fp32
    with pytest.raises(ValueError, match="NF4"):
        CompiledDecoder(Phi.from_pretrained(tmp_path, quantize=quantizer("nf4")))  # fp32 compute: no kernel


def test_nf4_fused_matmul_takes_the_two_dimensional_state():
    # on a GPU, inference goes through bitsandbytes.matmul_4bit and its fused kernel; on a CPU the same call
    # dequantizes, which checks the state handed to it (shape, nested block scales) against our own dequantize
    torch.manual_seed(0)
    linear = nn.Linear(128, 96)
    q = quantize_linear(linear, "nf4")
    x = torch.randn(1, 1, 128)
    with torch.no_grad():
        torch.testing.assert_close(q.fused_matmul(x), x @ q.dequantized_weight().T + linear.bias, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_multiplies_and_sums_in_the_compiled_cpu_decode_step(dtype, patch_compile):
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(256, 96), "int8")
    w = q.dequantized_weight(torch.float32)
    graphs = patch_compile()
    step = torch.compile(use_multiply_sum(q), dynamic=False)
    x = torch.randn(1, 1, 256).to(dtype)
    with torch.no_grad():
        y = step(x)
    assert [n.target for n in graphs[0].graph.nodes].count(torch.ops.omniphi.materialize.default) == 1
    assert y.dtype == dtype
    assert relative_error(y.float(), x.float() @ w.T + q.bias) < (1e-6 if dtype == torch.float32 else 0.01)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_linear_forward_backward_dtype_and_device(kind):
    torch.manual_seed(0)
    linear = nn.Linear(96, 64)
    q = quantize_linear(linear, kind)
    assert (q.in_features, q.out_features, q.kind) == (96, 64, kind)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = q(x)
    w = q.dequantized_weight()
    torch.testing.assert_close(y, x @ w.T + linear.bias, rtol=0, atol=1e-5)
    y.square().sum().backward()
    x_ref = x.detach().requires_grad_()
    (x_ref @ w.T + linear.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-4)
    assert not any(p.requires_grad for p in q.parameters())
    y16 = q(x.detach().bfloat16())  # bf16 compute, fp32 bias
    assert y16.dtype == torch.bfloat16 and relative_error(y16, y) < 0.02
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q(x.detach()).dtype == torch.bfloat16
    stats = {name: b.clone() for name, b in q.named_buffers()}
    q.to(torch.bfloat16)  # casts the bias, never the quantized weight or its statistics
    assert q.bias.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16
    assert all(torch.equal(b, stats[name]) and b.dtype == stats[name].dtype for name, b in q.named_buffers())
    q.to("meta")  # every tensor follows a device move
    assert all(t.device.type == "meta" for t in (*q.buffers(), *q.parameters()))


# ---- loading quantized -------------------------------------------------------------------------------

BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_from_pretrained_quantized(checkpoint, kind):
    full = Phi.from_pretrained(checkpoint)
    quantized = Phi.from_pretrained(checkpoint, quantize=quantizer(kind))
    dequantized, noisy = Phi.from_pretrained(checkpoint), Phi.from_pretrained(checkpoint)
    torch.manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(quantized.model.layers):
            for name in BLOCK_LINEARS:
                q, w = block.get_submodule(name), full.model.layers[i].get_submodule(name).weight
                assert isinstance(q, NF4Linear if kind == "nf4" else Int8Linear)
                dequantized.model.layers[i].get_submodule(name).weight.copy_(q.dequantized_weight())
                noise = torch.randn_like(w)
                noisy.model.layers[i].get_submodule(name).weight.add_(noise * relative_error(q.dequantized_weight(), w) * w.norm() / noise.norm())
    assert type(quantized.lm_head) is nn.Linear and type(quantized.model.embed_tokens) is nn.Embedding
    idx = torch.randint(0, VOCAB, (2, 24))
    expected, got = logits_of(full, idx), logits_of(quantized, idx)
    assert (got - logits_of(dequantized, idx)).abs().max() <= 1e-4  # exactly the model with dequantized weights
    # NF4 (~9% per weight) and int8 (~0.6%) act like white noise of that size on every block weight: the logits
    # move about as much as a model whose weights carry such noise; int8 an order of magnitude less than NF4.
    error = relative_error(got, expected)
    assert 0 < error < 1.5 * relative_error(logits_of(noisy, idx), expected)
    assert error < (0.3 if kind == "nf4" else 0.03)
    bf16 = Phi.from_pretrained(checkpoint, dtype=torch.bfloat16, quantize=quantizer(kind))
    assert bf16.model.layers[0].mlp.fc1.compute_dtype == torch.bfloat16
    assert relative_error(logits_of(bf16, idx), got) < 0.05  # bf16 compute adds ~1% on top


# ---- adapters: identity, merge, PEFT ------------------------------------------------------------------

@pytest.mark.parametrize("quantize", [None, "nf4", "int8"])
def test_fresh_adapter_is_identity_and_merge_matches(checkpoint, quantize, tmp_path):
    model = Phi.from_pretrained(checkpoint, quantize=quantizer(quantize))
    idx = torch.randint(0, VOCAB, (2, 16))
    before = logits_of(model, idx)
    apply_lora(model, r=4, alpha=8)
    assert torch.equal(logits_of(model, idx), before)
    train_steps(model, torch.randint(0, VOCAB, (2, 17)))
    unmerged = logits_of(model, idx)
    assert (unmerged - before).abs().max() > 1e-2  # the adapters really moved the model
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, QuantizedLinear)) for m in model.modules())
    merged = logits_of(model, idx)
    # the merged weight is dequantize(W) + scaling * B @ A exactly, so only fp32 rounding separates the two
    assert (merged - unmerged).abs().max() <= 1e-4
    model.save_pretrained(tmp_path)
    hf = PhiForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(idx).logits - merged).abs().max() <= 1e-4


@pytest.mark.parametrize("targets", [("q_proj", "dense", "fc1"), ("fc2", "lm_head")])
def test_our_adapter_loads_in_peft(checkpoint, tmp_path, targets):
    model = apply_lora(Phi.from_pretrained(checkpoint), r=4, alpha=8, targets=targets)
    perturb_lora(model)
    save_adapter(model, tmp_path, base_model_name_or_path=str(checkpoint))
    peft_model = PeftModel.from_pretrained(PhiForCausalLM.from_pretrained(checkpoint), tmp_path).eval()
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = peft_model(idx).logits
    assert (logits_of(model, idx) - expected).abs().max() <= 1e-4
    assert (expected - PhiForCausalLM.from_pretrained(checkpoint)(idx).logits).abs().max() > 1e-2
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["target_modules"] == sorted(targets)


def test_peft_adapter_loads_here(checkpoint, tmp_path):
    torch.manual_seed(2)
    config = LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "v_proj", "fc2", "lm_head"], init_lora_weights=False,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(PhiForCausalLM.from_pretrained(checkpoint), config).eval()
    peft_model.save_pretrained(tmp_path)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = peft_model(idx).logits
    model = load_adapter(Phi.from_pretrained(checkpoint), tmp_path)
    assert (logits_of(model, idx) - expected).abs().max() <= 1e-4
    assert model.lora_config.r == 6 and sorted(model.lora_config.targets) == ["fc2", "lm_head", "q_proj", "v_proj"]
    reloaded = apply_lora(Phi.from_pretrained(checkpoint), r=6, alpha=12, targets=("fc2", "v_proj", "q_proj", "lm_head"))
    assert torch.equal(logits_of(load_adapter(reloaded, tmp_path), idx), logits_of(model, idx))
    qlora = load_adapter(Phi.from_pretrained(checkpoint), tmp_path, quantize="nf4")  # quantize passthrough
    assert isinstance(qlora.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert isinstance(qlora.model.layers[0].self_attn.k_proj, nn.Linear)
    assert type(qlora.lm_head.base_layer) is nn.Linear  # the output head is adapted but never quantized
    assert torch.equal(qlora.model.layers[1].mlp.fc2.lora_B.weight, model.model.layers[1].mlp.fc2.lora_B.weight)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_dtypes(base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(64, 48).to(base_dtype)
    layer = LoRALinear(quantize_linear(base, "nf4"), r=4, alpha=8)
    perturb_lora(layer)
    x = torch.randn(2, 5, 64, dtype=base_dtype)
    out = layer(x)
    assert out.dtype == base_dtype and layer.lora_A.weight.dtype == torch.float32
    w = layer.base_layer.dequantized_weight(torch.float32) + layer.lora_B.weight @ layer.lora_A.weight * 2.0
    expected = x.float() @ w.T + base.bias.float()
    assert relative_error(out, expected) < (1e-5 if base_dtype == torch.float32 else 2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 activations, bf16 compute, fp32 LoRA grads
        out = layer(x.float())
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0
    assert relative_error(layer.merged()(x), expected) < (1e-5 if base_dtype == torch.float32 else 2e-2)


# ---- training --------------------------------------------------------------------------------------

def test_only_lora_and_projector_get_gradients(checkpoint):
    model = apply_lora(Phi.from_pretrained(checkpoint, quantize=quantizer("nf4")), r=4, alpha=8, dropout=0.1)
    projector = nn.Linear(8, 160)  # stands in for the multimodal projector the caller trains alongside
    model.train()
    features, idx = torch.randn(2, 3, 8), torch.randint(0, VOCAB, (2, 10))
    embeds = torch.cat((projector(features), model.model.embed_tokens(idx)), dim=1)
    _, loss = model(inputs_embeds=embeds[:, :-1], targets=torch.cat((idx, idx[:, :3]), dim=1)[:, 1:])
    loss.backward()
    lora = {id(p) for p in lora_parameters(model)}
    assert len(lora) == 2 * 6 * 2
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in lora) == p.requires_grad, name
    assert all(p.grad is not None for p in projector.parameters())
    for layer in (m for m in model.modules() if isinstance(m, LoRALinear)):  # B starts at zero: only B moves first
        assert layer.lora_B.weight.grad.abs().sum() > 0 and not layer.lora_A.weight.grad.any()


def test_qlora_loss_goes_down(checkpoint):
    model = apply_lora(Phi.from_pretrained(checkpoint, quantize=quantizer("nf4")), r=8, alpha=16)
    model.train()
    optimizer = make_optimizer(lora_parameters(model), lr=1e-2, weight_decay=0.0, kind="adamw8bit")
    idx = torch.randint(0, VOCAB, (2, 25))
    losses = []
    for _ in range(10):
        _, loss = model(idx[:, :-1], targets=idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_gradient_checkpointing_gives_same_grads(checkpoint, quantize):
    model = apply_lora(Phi.from_pretrained(checkpoint, quantize=quantizer(quantize)), r=4, alpha=8)
    perturb_lora(model)
    model.train()
    idx = torch.randint(0, VOCAB, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model.config.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(idx[:, :-1], targets=idx[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in lora_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_make_optimizer_kinds():
    p = nn.Parameter(torch.randn(64, 64))
    assert isinstance(make_optimizer([p], 1e-3, 0.1), torch.optim.AdamW)
    for kind in ("adamw8bit", "paged_adamw8bit"):  # both run on CPU (paging only exists on CUDA)
        optimizer = make_optimizer([p], 1e-3, 0.0, kind=kind)
        p.grad = torch.randn_like(p)
        before = p.detach().clone()
        optimizer.step()
        assert not torch.equal(p, before)
    with pytest.raises(ValueError, match="sgd"):
        make_optimizer([p], 1e-3, 0.0, kind="sgd")
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], 1e-3, 0.0)


# ---- bad input -----------------------------------------------------------------------------------------

def test_bad_input(checkpoint, tmp_path):
    model = Phi.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match=r"\['qkv'\].*'fc1'"):
        apply_lora(model, r=4, alpha=8, targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, r=0, alpha=8)
    with pytest.raises(ValueError, match="quantize"):
        apply_lora(model, r=4, alpha=8, quantize="nf3")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_linear(nn.Linear(4, 4), "fp8")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # failed calls changed nothing
    apply_lora(model, r=4, alpha=8)
    assert type(model.lm_head) is nn.Linear and not model.lm_head.weight.requires_grad
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, r=4, alpha=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "adapter_config.json").write_text("{}")
        load_adapter(model, tmp_path / "half")
    other = tmp_path / "other_base"
    make_hf(hidden_size=200).save_pretrained(other)
    save_adapter(apply_lora(Phi.from_pretrained(other), r=4, alpha=8), tmp_path / "other_adapter")
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.layers\.0\..*another base model"):
        load_adapter(Phi.from_pretrained(checkpoint), tmp_path / "other_adapter")
    with pytest.raises(ValueError, match="differs"):
        save_adapter(apply_lora(Phi.from_pretrained(checkpoint), r=8, alpha=8), tmp_path / "r8")
        load_adapter(model, tmp_path / "r8")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapter(Phi.from_pretrained(checkpoint), tmp_path / "none")
