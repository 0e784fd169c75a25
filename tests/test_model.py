"""Phi parity with transformers.PhiForCausalLM: logits, generation, checkpoints (single, sharded, bf16), bad input."""

import json

import pytest
import torch

from transformers import PhiConfig as HFPhiConfig
from transformers import PhiForCausalLM

from model import Phi, PhiConfig, sample

CONFIGS = {
    "phi2_proportions": dict(hidden_size=160, num_attention_heads=2, partial_rotary_factor=0.4),  # head_dim 80, rotary 32
    "half_rotary": dict(hidden_size=96, num_attention_heads=4, partial_rotary_factor=0.5),
    "grouped_kv": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5),
    "full_rotary": dict(hidden_size=64, num_attention_heads=2, partial_rotary_factor=1.0, rope_theta=500.0),
}


def make_hf(seed=0, vocab_size=512, num_hidden_layers=2, max_position_embeddings=128, **kw):
    torch.manual_seed(seed)
    kw = {**CONFIGS["phi2_proportions"], **kw}
    config = HFPhiConfig(vocab_size=vocab_size, intermediate_size=4 * kw["hidden_size"], num_hidden_layers=num_hidden_layers,
                         max_position_embeddings=max_position_embeddings, initializer_range=0.1, resid_pdrop=0.0,
                         embd_pdrop=0.0, attention_dropout=0.0, **kw)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():  # HF zeroes biases and sets LayerNorms to identity; perturb them so they are tested
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf()
    path = tmp_path_factory.mktemp("phi")
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name, tmp_path):
    hf = make_hf(**CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = Phi.from_pretrained(tmp_path)
    idx = torch.randint(0, 512, (2, 37))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - expected).abs().max() <= 1e-4


def test_loss_matches_transformers(checkpoint):
    hf, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (2, 20))
    targets = idx[:, 1:].clone()
    targets[0, :5] = -100
    with torch.no_grad():
        labels = idx.clone()
        labels[0, 1:6] = -100
        expected = hf(idx, labels=labels).loss
        _, loss = ours(idx[:, :-1], targets=targets)
    assert abs(loss.item() - expected.item()) <= 1e-5


def test_padding_mask_matches_transformers(checkpoint):
    hf, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask, position_ids=position_ids).logits
        logits, _ = ours(idx, attention_mask=mask)
    assert (logits[mask.bool()] - expected[mask.bool()]).abs().max() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    hf = make_hf(seed=1)
    hf.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = Phi.from_pretrained(tmp_path)
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4


def test_greedy_generation_matches_transformers(checkpoint):
    hf, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (1, 9))
    expected = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = ours.generate(idx, 20, temperature=0, eos_id=None)
    assert torch.equal(got, expected)


def test_cached_decoding_equals_recomputing(checkpoint):
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (1, 5))
    seq = idx
    with torch.no_grad():
        for _ in range(15):
            seq = torch.cat((seq, ours(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(ours.generate(idx, 15, temperature=0, eos_id=None), seq)


def test_batched_left_padded_equals_one_by_one(checkpoint):
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    prompts = [torch.randint(0, 512, (n,)) for n in (3, 11, 7)]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        batch[i, width - len(p):], mask[i, width - len(p):] = p, 1
    out = ours.generate(batch, 12, temperature=0, eos_id=None, attention_mask=mask)
    for i, p in enumerate(prompts):
        single = ours.generate(p[None], 12, temperature=0, eos_id=None)
        assert torch.equal(out[i, width:], single[0, len(p):])


def test_stream_yields_what_generate_returns_and_stops_at_eos(checkpoint):
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    idx = torch.randint(0, 512, (1, 6))
    full = ours.generate(idx, 10, temperature=0, eos_id=None)
    streamed = torch.stack(list(ours.generate_stream(idx, 10, temperature=0, eos_id=None)), dim=1)
    assert torch.equal(full[:, 6:], streamed)
    eos = int(full[0, 9])  # pretend the 4th new token is end-of-text
    stopped = ours.generate(idx, 10, temperature=0, eos_id=eos)
    assert stopped.shape[1] <= 10 and int(stopped[0, -1]) == eos
    assert all(block.self_attn.kv_cache is None for block in ours.model.layers)  # cache freed


def test_sampling_options():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(200)}
    assert draws == {1, 3}
    assert sample(logits, 0).item() == 1


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = Phi(PhiConfig.from_preset("tiny", vocab_size=300, max_position_embeddings=64)).eval()
    ours.save_pretrained(tmp_path)
    hf = PhiForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "sharded", max_shard_size=200_000)
    again = Phi.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ours(idx)[0])


def test_bf16_load(checkpoint):
    hf, path = checkpoint
    ours = Phi.from_pretrained(path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    hf16 = PhiForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    idx = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref32 = hf(idx).logits
        ours16, ref16 = ours(idx)[0].float(), hf16(idx).logits.float()
    assert (ours16 - ref16).abs().max() <= 0.1
    assert (ours16 - ref32).abs().max() <= 2 * (ref16 - ref32).abs().max() + 0.05
    assert ours.generate(idx, 5, temperature=0, eos_id=None).shape == (1, 21)


def test_config_round_trips_through_hf_json(checkpoint):
    _, path = checkpoint
    raw = json.loads((path / "config.json").read_text())
    config = PhiConfig.from_hf_json(raw)
    assert (config.head_dim, config.rotary_dim) == (80, 32)
    assert PhiConfig.from_hf_json(config.to_hf_json()) == config
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}  # Phi-2's own config.json style
    legacy.update(partial_rotary_factor=0.4, rope_theta=10000.0)
    assert PhiConfig.from_hf_json(legacy) == config
    phi2 = PhiConfig.from_preset("phi-2")
    assert (phi2.hidden_size, phi2.num_hidden_layers, phi2.head_dim, phi2.rotary_dim, phi2.vocab_size) == (2560, 32, 80, 32, 51200)


def test_flops_per_token_hand_count():
    c = PhiConfig.from_preset("tiny", vocab_size=1000)
    model = Phi(c)
    d, f, L, T = c.hidden_size, c.intermediate_size, c.num_hidden_layers, 64
    per_layer = 4 * d * d + 2 * d * f
    hand = 6 * (L * per_layer + d * c.vocab_size) + 6 * 2 * L * d * T
    assert model.flops_per_token(T) == hand


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = Phi(PhiConfig.from_preset("tiny", vocab_size=300))
    idx = torch.randint(0, 300, (2, 16))
    model(idx, targets=idx)[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.config.gradient_checkpointing = True
    model(idx, targets=idx)[1].backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(plain, model.parameters()))


# ---- bad input ---------------------------------------------------------------------------------------

def test_missing_folder_says_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Phi.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="hf download"):
        Phi.from_pretrained("no-such-org-xyz/no-such-model")


def test_missing_shard(tmp_path):
    make_hf().save_pretrained(tmp_path, max_shard_size="300KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match="model-00001"):
        Phi.from_pretrained(tmp_path)


def test_wrong_shape_and_unknown_tensor_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.fc1.weight"):
        Phi.from_pretrained(tmp_path)
    del state["model.layers.1.mlp.fc1.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        Phi.from_pretrained(tmp_path)
    state["model.layers.1.mlp.fc1.weight"] = torch.zeros(640, 160)
    state["model.layers.1.mlp.gate.weight"] = torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="mlp.gate.weight"):
        Phi.from_pretrained(tmp_path)


def test_wrong_dtype_request(checkpoint):
    _, path = checkpoint
    with pytest.raises(ValueError, match="unsupported dtype"):
        Phi.from_pretrained(path, dtype="float8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        Phi.from_pretrained(path, dtype=torch.int32)


def test_empty_and_too_long_prompts(checkpoint):
    _, path = checkpoint
    ours = Phi.from_pretrained(path)
    with pytest.raises(ValueError, match="empty"):
        ours.generate(torch.zeros(1, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="longer than the context"):
        ours.generate(torch.zeros(1, 120, dtype=torch.long), 20)
    with pytest.raises(ValueError, match="longer than the context"):
        ours(torch.zeros(1, 129, dtype=torch.long))


