"""
Phi-2 in one file: config, blocks, a static KV cache, generation, and loading/saving the Hugging Face
safetensors layout (so `microsoft/phi-2` loads here and a model trained here loads in transformers).

Module names mirror transformers' PhiForCausalLM, so state_dict keys are the checkpoint's tensor names.
"""

import contextlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class PhiConfig:
    vocab_size: int = 51200
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 2048
    partial_rotary_factor: float = 0.4
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    gradient_checkpointing: bool = False

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self):
        return int(self.head_dim * self.partial_rotary_factor)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dimension {self.rotary_dim} must be even")

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown preset '{name}'; choose from {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_hf_json(cls, d):
        if d.get("model_type", "phi") != "phi":
            raise ValueError(f"config.json describes a '{d.get('model_type')}' model, not 'phi'")
        if d.get("qk_layernorm") or d.get("tie_word_embeddings"):
            raise ValueError("qk_layernorm and tied embeddings are not part of Phi-2 and are not supported")
        rope = d.get("rope_parameters") or {}  # transformers >= 5 nests these
        d = {**d, **{k: rope[k] for k in ("rope_theta", "partial_rotary_factor") if k in rope}}
        names = {f.name for f in fields(cls)} - {"gradient_checkpointing"}
        kwargs = {k: d[k] for k in names if d.get(k) is not None}
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads", cls.num_attention_heads))
        return cls(**kwargs)

    def to_hf_json(self):
        d = asdict(self)
        del d["gradient_checkpointing"]
        return {"architectures": ["PhiForCausalLM"], "model_type": "phi", "hidden_act": "gelu_new",
                "qk_layernorm": False, "tie_word_embeddings": False, "bos_token_id": 50256, "eos_token_id": 50256,
                "initializer_range": 0.02, "torch_dtype": "float32", **d,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                    "partial_rotary_factor": self.partial_rotary_factor}}


PRESETS = {
    "phi-2": dict(),
    "phi-1_5": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                    num_key_value_heads=32, partial_rotary_factor=0.5),
    "small": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, max_position_embeddings=1024, partial_rotary_factor=0.5),
    "demo": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5),
    "tiny": dict(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=256),  # Phi-2's head_dim 80, rotary 32
}


class KVCache(nn.Module):
    """Preallocated keys and values; written at explicit slots so shapes never change while decoding."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


def apply_rotary(x, cos, sin, rotary_dim):
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


def attention(q, k, v, mask=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(head_dim)) v, query heads sharing key heads in groups; mask (B, 1, Tq, Tk) bool, None: causal."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


class PhiAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.n_head, self.n_kv_head, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.head_dim)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_head * self.head_dim)
        self.dense = nn.Linear(self.n_head * self.head_dim, config.hidden_size)
        self.kv_cache = None
        self.attend = attention  # decoding.py puts in a faster function for one query on a CPU

    def forward(self, x, cos, sin, mask, cache_slots=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin, self.config.rotary_dim)
        k = apply_rotary(k, cos, sin, self.config.rotary_dim)
        if cache_slots is not None:
            k, v = self.kv_cache.update(cache_slots, k, v)
        y = self.attend(q, k, v, mask, self.config.attention_dropout if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(B, T, -1))


class PhiMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PhiBlock(nn.Module):
    """Attention and MLP side by side on one shared LayerNorm."""

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PhiAttention(config)
        self.mlp = PhiMLP(config)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, cos, sin, mask, cache_slots=None):
        h = self.input_layernorm(x)
        return self.resid_dropout(self.self_attn(h, cos, sin, mask, cache_slots)) + self.resid_dropout(self.mlp(h)) + x


class PhiModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.embd_pdrop)
        self.layers = nn.ModuleList(PhiBlock(config) for _ in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class Phi(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = PhiModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self._init_rope()
        if self.lm_head.weight.device.type != "meta":
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
                if name.endswith(("dense.weight", "fc2.weight")):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_hidden_layers))

    def _init_rope(self, device=None):
        c = self.config
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.rotary_dim, 2, dtype=torch.float32, device=device) / c.rotary_dim))
        freqs = torch.outer(torch.arange(c.max_position_embeddings, dtype=torch.float32, device=device), inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", freqs.cos(), persistent=False)
        self.register_buffer("rope_sin", freqs.sin(), persistent=False)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if non_embedding else n

    # ---- forward ----------------------------------------------------------------------------------

    def hidden_states(self, idx=None, *, inputs_embeds=None, attention_mask=None, position_ids=None, cache_slots=None):
        """Final-LayerNorm output (B, T, hidden). With a KV cache, cache_slots are the columns written."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx and inputs_embeds")
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if T == 0:
            raise ValueError("empty input: at least one token is needed")
        caching = cache_slots is not None
        if caching and self.model.layers[0].self_attn.kv_cache is None:
            raise ValueError("cache_slots given but no KV cache is set up (call setup_cache first)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=x.device).expand(B, T)
        if not caching and T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the context of {self.config.max_position_embeddings} tokens")
        dtype = x.dtype if not torch.is_autocast_enabled(x.device.type) else torch.get_autocast_dtype(x.device.type)
        cos = self.rope_cos[position_ids].unsqueeze(1).to(dtype)
        sin = self.rope_sin[position_ids].unsqueeze(1).to(dtype)
        mask = None
        if caching or attention_mask is not None:
            q_slots = cache_slots if caching else torch.arange(T, device=x.device)
            n_keys = self.model.layers[0].self_attn.kv_cache.k.shape[2] if caching else T
            keys = torch.arange(n_keys, device=x.device)
            key_ok = attention_mask.bool() if attention_mask is not None else torch.ones(B, n_keys, dtype=torch.bool, device=x.device)
            # a padded query may always see itself, so no softmax row is empty (that would give NaN)
            mask = ((q_slots[:, None] >= keys[None, :]) & key_ok[:, None, :]) | (q_slots[:, None] == keys[None, :])
            mask = mask.unsqueeze(1)
        x = self.model.embed_dropout(x)
        for block in self.model.layers:
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, cache_slots, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache_slots)
        return self.model.final_layernorm(x)

    def forward(self, idx=None, *, inputs_embeds=None, targets=None, attention_mask=None, position_ids=None):
        """Logits for every position; targets are aligned with them (targets[t] is the token after t), -100 ignored."""
        logits = self.lm_head(self.hidden_states(idx, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                                 position_ids=position_ids))
        loss = None
        if targets is not None:
            flat = targets.reshape(-1)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat, ignore_index=-100, reduction="sum")
            loss = loss / (flat != -100).sum().clamp(min=1)
        return logits, loss

    # ---- generation --------------------------------------------------------------------------------

    def setup_cache(self, batch_size, max_len, dtype=None, device=None):
        """Preallocate every layer's KV cache; an existing cache of the same shape is reused (no recompiles)."""
        weight = self.model.final_layernorm.weight  # lm_head may be wrapped by a LoRA adapter
        dtype, device = dtype or weight.dtype, device or weight.device
        for block in self.model.layers:
            old = block.self_attn.kv_cache
            if old is None or old.k.shape[0] != batch_size or old.k.shape[2] != max_len or old.k.dtype != dtype:
                block.self_attn.kv_cache = KVCache(batch_size, max_len, self.config.num_key_value_heads,
                                                   self.config.head_dim, dtype, device)

    def clear_cache(self):
        for block in self.model.layers:
            block.self_attn.kv_cache = None

    def decode_step(self, tokens, position_ids, cache_slots, key_mask):
        """One cached step: tokens (B, 1) at position_ids (B, 1) into column cache_slots (1,). Returns (B, vocab)."""
        h = self.hidden_states(tokens, position_ids=position_ids, attention_mask=key_mask, cache_slots=cache_slots)
        return self.lm_head(h[:, -1]).float()

    @torch.inference_mode()
    def generate_stream(self, idx=None, max_new_tokens=128, *, temperature=1.0, top_k=None, top_p=None, eos_id=50256,
                        attention_mask=None, inputs_embeds=None, generator=None, decoder=None):
        """Yields the next token of every sequence, (B,), until max_new_tokens or all have produced eos_id.
        Prompts of different lengths are left-padded with attention_mask marking the real tokens.
        Finished sequences keep yielding eos_id. Each new token is one decode_step; a decoder (decoding.py's compiled
        one) replaces it with its own step and picks the cache length (decoder.cache_len), and the cache is then kept
        between calls."""
        prompt = idx if inputs_embeds is None else inputs_embeds
        if prompt is None:
            raise ValueError("pass idx or inputs_embeds")
        B, T = prompt.shape[:2]
        device = prompt.device
        if T == 0:
            raise ValueError("empty prompt: at least one token is needed")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if T + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"prompt of {T} tokens plus {max_new_tokens} new tokens is longer than the context of "
                             f"{self.config.max_position_embeddings} tokens")
        mask = torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None else attention_mask.bool().to(device)
        if not mask.any(-1).all():
            raise ValueError("a prompt in the batch is entirely padding")
        cache_len = T + max_new_tokens if decoder is None else decoder.cache_len(T + max_new_tokens)
        key_mask = torch.zeros(B, cache_len, dtype=torch.bool, device=device)
        key_mask[:, :T] = mask
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        decode_step = self.decode_step if decoder is None else decoder.step
        self.setup_cache(B, cache_len)
        try:
            h = self.hidden_states(idx, inputs_embeds=inputs_embeds, position_ids=position_ids,
                                   attention_mask=key_mask, cache_slots=torch.arange(T, device=device))
            logits = self.lm_head(h[:, -1]).float()
            next_pos = position_ids[:, -1:] + 1
            finished = torch.zeros(B, dtype=torch.bool, device=device)
            for i in range(max_new_tokens):
                token = sample(logits, temperature, top_k, top_p, generator)
                if eos_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_id), token)
                    finished |= token == eos_id
                yield token
                if i == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                    break
                key_mask[:, T + i] = True
                logits = decode_step(token[:, None], next_pos, torch.tensor([T + i], device=device), key_mask)
                next_pos = next_pos + 1
        finally:
            if decoder is None:
                self.clear_cache()

    @torch.inference_mode()
    def generate(self, idx=None, max_new_tokens=128, *, temperature=1.0, top_k=None, top_p=None, eos_id=50256,
                 attention_mask=None, inputs_embeds=None, generator=None, decoder=None):
        """Returns (B, T + new) token ids (with inputs_embeds only the new ids, (B, new))."""
        new = list(self.generate_stream(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                        eos_id=eos_id, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                        generator=generator, decoder=decoder))
        new = torch.stack(new, dim=1)
        return new if idx is None else torch.cat((idx, new), dim=1)

    # ---- training helpers -------------------------------------------------------------------------------

    def flops_per_token(self, seq_len):
        """Forward + backward FLOPs per token: 6 per weight of every matmul, plus attention's scores and mix."""
        c = self.config
        matmul_weights = self.num_params(non_embedding=True) - sum(
            p.numel() for n, p in self.named_parameters() if p.dim() < 2)
        attention = 2 * 2 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len
        return 6 * matmul_weights + 3 * attention

    def estimate_mfu(self, tokens_per_s, seq_len, peak_flops):
        return self.flops_per_token(seq_len) * tokens_per_s / peak_flops

    # ---- checkpoints -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_hub_id, *, dtype=None, device="cpu", quantize=None):
        """Load an HF-layout folder (config.json + model.safetensors or an index with shards) or a hub id.
        Tensors are read one at a time into the target dtype on a meta-built model, so no fp32 copy is made.
        quantize, a load hook: a function that turns each block nn.Linear, as soon as it is loaded, into the module
        that replaces it (lora.quantizer("nf4") or ("int8")), so a full-precision copy of the blocks never exists."""
        from safetensors import safe_open

        dtype = resolve_dtype(dtype)
        if quantize is not None and not callable(quantize):
            raise TypeError(f"quantize must be a function nn.Linear -> module, e.g. lora.quantizer('nf4'); got {quantize!r}")
        folder = resolve_checkpoint(path_or_hub_id, "microsoft/phi-2")
        config = PhiConfig.from_hf_json(json.loads((folder / "config.json").read_text()))
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        pending = {}  # quantizable linear -> names of its tensors not loaded yet
        if quantize is not None:
            for name, module in model.model.layers.named_modules():
                if isinstance(module, nn.Linear):
                    pending[f"model.layers.{name}"] = {"weight", "bias"}
        for file in checkpoint_files(folder):
            with safe_open(file, framework="pt", device="cpu") as f:
                names = list(f.keys())
            for name in names:
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name not in expected:
                    raise ValueError(f"unexpected tensor '{name}' in {file.name}: not part of a Phi model")
                # one short-lived file mapping per tensor, copied out: the file's pages are let go as soon as the
                # tensor is in place (or quantized), so memory peaks at the model being built, never at a whole shard
                with safe_open(file, framework="pt", device="cpu") as f:
                    tensor = f.get_tensor(name)
                if tensor.shape != expected.pop(name):
                    raise ValueError(f"tensor '{name}' in {file.name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(model.state_dict()[name].shape)}")
                module_name, attr = name.rsplit(".", 1)
                module = model.get_submodule(module_name)
                module._parameters[attr] = nn.Parameter(tensor.to(device=device, dtype=dtype, copy=True))
                del tensor
                if module_name in pending:
                    pending[module_name].discard(attr)
                    if not pending[module_name]:
                        parent, child = module_name.rsplit(".", 1)
                        setattr(model.get_submodule(parent), child, quantize(module))
                        del pending[module_name]
        if expected:
            raise ValueError(f"checkpoint {folder} is missing {len(expected)} tensors, e.g. '{next(iter(expected))}'")
        model._init_rope(device)
        return model.eval()

    def save_pretrained(self, out_dir, max_shard_size=None):
        """Write config.json + model.safetensors (or shards + index) that transformers.PhiForCausalLM loads."""
        state = self.state_dict()
        bad = sorted(set(state) - self._hf_names())
        if bad:
            raise ValueError(f"cannot save '{bad[0]}' in the HF layout: merge LoRA adapters (lora.merge_lora) and "
                             "save an unquantized model")
        out = save_safetensors(state, out_dir, max_shard_size)
        hf = self.config.to_hf_json()
        hf["torch_dtype"] = str(self.lm_head.weight.dtype).removeprefix("torch.")
        atomic_write(out / "config.json", json.dumps(hf, indent=2))

    def _hf_names(self):
        names = {"model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                 "lm_head.weight", "lm_head.bias"}
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            names |= {p + m + "." + t for m in ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                                                  "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2")
                      for t in ("weight", "bias")}
        return names


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def resolve_dtype(dtype):
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        if dtype not in names:
            raise ValueError(f"unsupported dtype '{dtype}'; use one of {', '.join(names)}")
        return names[dtype]
    if dtype not in names.values():
        raise ValueError(f"unsupported dtype {dtype}; use torch.float32, torch.float16 or torch.bfloat16")
    return dtype


def resolve_checkpoint(path_or_hub_id, example_id="microsoft/phi-2"):
    """A local folder as it is, or a hub id ("owner/name", not a path that exists or starts like one) downloaded
    (safetensors + json only) when huggingface_hub and a network exist."""
    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        if (path / "ckpt" / "config.json").is_file():  # a run folder of train_lm.py
            return path / "ckpt"
        raise FileNotFoundError(f"{path} has no config.json; expected a Hugging Face checkpoint folder (or a run "
                                "folder with ckpt/ in it)")
    if path.exists():
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    how = f"download it first, e.g. `hf download {example_id} --local-dir checkpoints/{example_id.split('/')[-1]}`"
    looks_local = text.startswith(("/", ".", "~")) or Path(text.split("/")[0]).is_dir() or text.count("/") != 1
    if looks_local or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        raise FileNotFoundError(f"checkpoint folder {text} does not exist ({how}, then pass that folder)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:
        reason = "huggingface_hub is not installed" if isinstance(err, ImportError) else \
            f"the download failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise FileNotFoundError(f"checkpoint folder {text} does not exist, and as a hub id it could not be had "
                                f"({reason}); {how} and pass that folder") from None


def checkpoint_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                                "(only safetensors checkpoints are read)")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint shard {f} is missing (listed in model.safetensors.index.json)")
    return files


def save_safetensors(state, out_dir, max_shard_size=None):
    """model.safetensors, or shards of at most max_shard_size bytes + model.safetensors.index.json; each file
    is written under a temporary name and renamed, and files of an earlier layout are removed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_size and current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[k] = v.detach().contiguous().cpu()
        size += nbytes
    shards.append(current)
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(shard, out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        atomic_write(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    return out


def write_safetensors(tensors, path, metadata=None):
    """One safetensors file, written under a temporary name and published (see publish)."""
    from safetensors.torch import save_file

    tmp = Path(f"{path}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"})
    publish(tmp, path)


def publish(tmp, path):
    """Give a finished temporary file the usual permissions (readable by all, as for any file the user writes),
    flush it to disk and rename it into place."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(Path(path).parent)


def atomic_write(path, data):
    """Write text or bytes under a temporary name, flush it to disk and rename it into place."""
    tmp = Path(f"{path}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    publish(tmp, path)


def fsync_folder(folder):
    """Flush a folder's entries (renames into it) to disk."""
    with contextlib.suppress(OSError):  # some file systems cannot open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
