"""
LoRA fine-tuning over frozen bases: 16/32-bit nn.Linear, or weight-only quantized linears (NF4 with double
quantization through bitsandbytes, as in QLoRA, or per-channel int8 in plain torch). Inject adapters, merge
them back, and save/load them in the PEFT layout so adapters move freely between here and transformers+peft.

    model = Phi.from_pretrained("checkpoints/phi-2", dtype=torch.bfloat16, quantize=quantizer("nf4"))
    apply_lora(model, r=64, alpha=16, dropout=0.05)      # freezes everything else
    optimizer = make_optimizer(lora_parameters(model), lr=2e-4, weight_decay=0.0, kind="paged_adamw8bit")
    ...
    save_adapter(model, "out/adapter")                   # peft.PeftModel.from_pretrained reads this folder

bitsandbytes is imported only where NF4 or an 8-bit optimizer is used, so 16-bit LoRA runs without it.
"""

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# bitsandbytes warns when it is imported that an optional hub kernel (the `kernels` package) is missing; its own CPU
# kernel works without it, so that is not the user's problem
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "kernels-community" not in record.getMessage())

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")
KEEP_EXACT = ("lm_head",)  # adapted only when named in the targets, and never quantized
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> PhiForCausalLM
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    r: int
    alpha: float
    dropout: float
    targets: tuple
    quantize: str = None


# ---- frozen weight-only quantized linears -------------------------------------------------------------

class DequantizedMatmul(torch.autograd.Function):
    """x @ W.T with W rebuilt from its quantized form in forward and again in backward, so no dequantized
    copy stays alive between them (W is frozen: it gets no gradient). W = weight * scale[:, None] where the
    layer has a per-row scale, which then multiplies the output instead of every weight."""

    @staticmethod
    def forward(ctx, x, quantized_linear):
        ctx.quantized_linear = quantized_linear
        weight, scale = quantized_linear.weight_and_scale(x.dtype)
        out = F.linear(x, weight)
        return out if scale is None else out * scale

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.quantized_linear.weight_and_scale(grad_out.dtype)
        return (grad_out if scale is None else grad_out * scale) @ weight, None


class QuantizedLinear(nn.Module):
    """A frozen linear whose weight lives in quantized buffers; the bias stays in floating point.
    Computes in the dtype of its input (or the autocast dtype); compute_dtype is the dtype the weight came in,
    used by dequantized_weight() and merge_lora."""

    kind = None

    def __init__(self, linear, compute_dtype=None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = compute_dtype or linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().to(self.compute_dtype)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x):
        dtype = self.input_dtype(x)
        out = DequantizedMatmul.apply(x.to(dtype), self)
        return out if self.bias is None else out + self.bias.to(dtype)

    @staticmethod
    def input_dtype(x):
        """The dtype to compute in: the autocast dtype where autocast is on, else x's."""
        return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

    def dequantized_weight(self, dtype=None):
        raise NotImplementedError

    def weight_and_scale(self, dtype):
        return self.dequantized_weight(dtype), None

    @property
    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def _apply(self, fn, recurse=True):
        # model.to(dtype) or .half() casts the bias but must not round the quantized weight's statistics:
        # buffers follow the device change only
        buffers = dict(self._buffers)
        self._buffers.clear()
        super()._apply(fn, recurse)
        for name, t in buffers.items():
            self._buffers[name] = None if t is None else t.to(fn(torch.empty(0, device=t.device)).device)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"kind={self.kind}, compute_dtype={self.compute_dtype}"


class NF4Linear(QuantizedLinear):
    """4-bit NormalFloat weight in blocks of 64 values; the fp32 block scales are themselves quantized to 8 bits
    in blocks of 256 (double quantization): about 4.127 bits per weight.
    Without autograd, bitsandbytes' inference kernels read the 4-bit weight directly instead of writing and
    reading a dequantized copy: its fused kernel on a GPU, and on a CPU with AVX512-BF16, for bf16, its CPU kernel,
    which wants the codes in another order (`cpu_layout`); the weight is reordered in place, and back again when
    training, merging or saving needs bitsandbytes' own layout."""

    kind = "nf4"

    def __init__(self, linear, compute_dtype=None, blocksize=64):
        import bitsandbytes.functional as bnbF
        super().__init__(linear, compute_dtype)
        # quantized as one flat vector (the bytes are the same as for the 2-D weight): bitsandbytes 0.50's CPU
        # dequantize kernel misplaces blocks that straddle rows when in_features is not a multiple of blocksize
        packed, state = bnbF.quantize_4bit(linear.weight.detach().reshape(-1), blocksize=blocksize,
                                           quant_type="nf4", compress_statistics=True)
        self.blocksize, self.absmax_blocksize = blocksize, state.state2.blocksize
        self.register_buffer("weight_nf4", packed)                 # two 4-bit codes per byte
        self.register_buffer("absmax", state.absmax)               # 8-bit codes of the block scales
        self.register_buffer("absmax_scale", state.state2.absmax)  # fp32 scale per 256 block scales
        self.register_buffer("absmax_code", state.state2.code)     # the 8-bit code book of the block scales
        self.register_buffer("absmax_offset", state.offset)        # mean block scale, removed before quantizing
        self.register_buffer("nf4_code", state.code)               # the 16 NF4 values
        self.register_buffer("cpu_absmax", None, persistent=False)  # bf16 block scales for the CPU kernel
        self.cpu_layout = False
        self.cpu_has_kernel = bnbF.has_avx512bf16()

    def forward(self, x):
        if not (torch.is_grad_enabled() and x.requires_grad):
            dtype = self.input_dtype(x)
            if x.is_cuda:
                return self.fused_matmul(x.to(dtype))
            if dtype == torch.bfloat16 and self.cpu_kernel_fits(x.device):
                return self.cpu_kernel_matmul(x.to(dtype))
        return super().forward(x)

    def quant_state(self, dtype=None, shape=None):
        import bitsandbytes.functional as bnbF
        nested = bnbF.QuantState(absmax=self.absmax_scale, code=self.absmax_code, blocksize=self.absmax_blocksize,
                                 dtype=torch.float32)
        return bnbF.QuantState(absmax=self.absmax, shape=torch.Size(shape or [self.out_features * self.in_features]),
                               code=self.nf4_code, blocksize=self.blocksize, quant_type="nf4",
                               dtype=dtype or self.compute_dtype, offset=self.absmax_offset, state2=nested)

    def dequantized_weight(self, dtype=None):
        import bitsandbytes.functional as bnbF
        self.set_cpu_layout(False)
        w = bnbF.dequantize_4bit(self.weight_nf4, self.quant_state(dtype))
        return w.view(self.out_features, self.in_features)

    def fused_matmul(self, x):
        """bitsandbytes.matmul_4bit without autograd: on a GPU, its fused 4-bit kernel for few rows."""
        import bitsandbytes as bnb
        self.set_cpu_layout(False)
        state = self.quant_state(x.dtype, shape=(self.out_features, self.in_features))
        return bnb.matmul_4bit(x, self.weight_nf4, state, bias=None if self.bias is None else self.bias.to(x.dtype))

    def cpu_kernel_fits(self, device):
        return device.type == "cpu" and self.out_features % 32 == 0 and self.in_features % self.blocksize == 0 \
            and self.cpu_has_kernel

    def ready_for_compiled_decoding(self):
        """True where the compiled decode step can call the CPU kernel (bf16 compute, on a CPU that has it); the
        weight is reordered now, so the graph never does it. Elsewhere bitsandbytes' calls break the graph."""
        if self.compute_dtype != torch.bfloat16 or not self.cpu_kernel_fits(self.weight_nf4.device):
            return False
        self.set_cpu_layout(True)
        return True

    def cpu_kernel_matmul(self, x):
        """bitsandbytes' AVX512-BF16 kernel: bf16 x times the 4-bit weight in its CPU layout, block scales in bf16."""
        self.set_cpu_layout(True)
        out = torch.ops.bitsandbytes.gemv_4bit.default(x, self.weight_nf4, [self.out_features, self.in_features],
                                                        self.cpu_absmax, self.nf4_code, self.blocksize)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def set_cpu_layout(self, on):
        """Reorder the 4-bit codes between bitsandbytes' layout (row-major, two per byte, the first in the high
        nibble) and its CPU kernel's: for each 32 rows and 2 columns, a group of 64 codes stored as 32 bytes, the
        first 32 codes in the low nibbles. Only the order changes, so nothing is lost either way."""
        if on == self.cpu_layout:
            return
        import bitsandbytes.functional as bnbF
        n, k = self.out_features, self.in_features
        b = self.weight_nf4.view(-1)
        if on:
            codes = torch.stack((b >> 4, b & 15), dim=-1).view(n // 32, 32, k // 2, 2).transpose(1, 2).reshape(-1, 64)
            b = (codes[:, 32:] << 4) | codes[:, :32]
            absmax = bnbF.dequantize_blockwise(self.absmax, self.quant_state().state2) + self.absmax_offset
            self.cpu_absmax = absmax.view(n, k // self.blocksize).T.contiguous().bfloat16()
        else:
            b = b.view(-1, 32)
            codes = torch.cat((b & 15, b >> 4), dim=-1).view(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(-1, 2)
            b = (codes[:, 0] << 4) | codes[:, 1]
            self.cpu_absmax = None
        self.weight_nf4.copy_(b.view_as(self.weight_nf4))
        self.cpu_layout = on

    def _apply(self, fn, recurse=True):
        self.set_cpu_layout(False)  # a move to another device takes bitsandbytes' own layout
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.set_cpu_layout(False)
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, *args, **kwargs):
        self.set_cpu_layout(False)
        super()._load_from_state_dict(*args, **kwargs)


class Int8Linear(QuantizedLinear):
    """Symmetric int8 weight with one floating-point scale per output channel (row)."""

    kind = "int8"

    def __init__(self, linear, compute_dtype=None):
        super().__init__(linear, compute_dtype)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_scale_bf16", scale.bfloat16(), persistent=False)  # the decode kernel's

    def forward(self, x):
        # decoding on a CPU in bf16: torch's fused int8 x bf16 kernel reads a quarter of fp32's bytes, where
        # dequantizing first would write and read the whole weight again; prefill and training dequantize.
        # The kernel crashed on widths that are not multiples of 16 (torch 2.13), hence the shape rule.
        rows = x.shape[:-1].numel()
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and rows <= 32 and self.in_features % 32 == 0 \
                and self.out_features % 16 == 0 and not torch.is_autocast_enabled("cpu") \
                and not (torch.is_grad_enabled() and x.requires_grad):
            out = torch._weight_int8pack_mm(x.reshape(rows, self.in_features), self.weight_int8,
                                            self.weight_scale_bf16).view(*x.shape[:-1], self.out_features)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        return super().forward(x)

    def dequantized_weight(self, dtype=None):
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(dtype or self.compute_dtype)

    def weight_and_scale(self, dtype):
        return self.weight_int8.to(dtype), self.weight_scale.to(dtype)  # -127..127 are exact in bf16 and fp16


def quantize_linear(linear, kind, compute_dtype=None):
    """A frozen weight-only quantized copy of an nn.Linear: kind "nf4" (bitsandbytes) or "int8"."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear needs an nn.Linear, got {type(linear).__name__}")
    if kind == "nf4":
        return NF4Linear(linear, compute_dtype)
    if kind == "int8":
        return Int8Linear(linear, compute_dtype)
    raise ValueError(f"unknown quantization {kind!r}; use 'nf4' or 'int8'")


def quantizer(kind):
    """The load hook of Phi.from_pretrained(..., quantize=quantizer("nf4")): quantizes each block linear as it loads.
    None for kind None or ""."""
    if not kind:
        return None
    if kind not in ("nf4", "int8"):
        raise ValueError(f"unknown quantization {kind!r}; use 'nf4' or 'int8'")
    return lambda linear: quantize_linear(linear, kind)


# ---- LoRA ---------------------------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """base(x) + B(A(dropout(x))) * alpha / r over a frozen base (nn.Linear or a QuantizedLinear).
    A and B are fp32 nn.Linears named like PEFT's (lora_A.weight, lora_B.weight); B starts at zero, so a
    fresh adapter changes nothing. The result comes back in the base's output dtype."""

    def __init__(self, base_layer, r, alpha, dropout=0.0):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        device = next(iter((*base_layer.parameters(), *base_layer.buffers()))).device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = self.base_layer(x)
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        return out + (update * self.scaling).to(out.dtype)

    @torch.no_grad()
    def merged(self):
        """A plain Linear holding W + scaling * B @ A, in the base's dtype (a quantized base is dequantized
        to its compute dtype first, so the result is full size)."""
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            dtype, w = base.compute_dtype, base.dequantized_weight(torch.float32)
        else:
            dtype, w = base.weight.dtype, base.weight.float()
        w = w + (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        return linear


def _linear_layers(model):
    """Every adaptable linear by full module name: nn.Linear or QuantizedLinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, QuantizedLinear))}


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model, *, r, alpha, dropout=0.0, targets=LORA_TARGETS, quantize=None):
    """Wrap every linear whose last name component is in targets with a LoRALinear, in place, and freeze every
    other parameter of the model: re-enable what else should train (e.g. a projector) after this call.
    Embeddings and LayerNorms are never adapted; lm_head only when named (a model whose output head never saw the
    words it must say needs it, as PEFT allows). quantize="nf4"|"int8" first quantizes the targeted block linears
    (Phi.from_pretrained(..., quantize=quantizer(kind)) quantizes them all while loading instead); lm_head is never quantized."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(dict.fromkeys(targets))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    if quantize not in (None, "nf4", "int8"):
        raise ValueError(f"quantize must be None, 'nf4' or 'int8', not {quantize!r}")
    if _lora_layers(model):
        raise ValueError("the model already has LoRA adapters; merge_lora() them or load_adapter() into them")
    linears = _linear_layers(model)
    available = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in targets if t not in available]
    if not targets or unknown:
        raise ValueError(f"LoRA targets {unknown or list(targets)} match no linear layer; the model's linear layers "
                         f"are {available}")
    chosen = {name: m for name, m in linears.items() if name.rsplit(".", 1)[-1] in targets}
    for name, m in chosen.items():
        if quantize and isinstance(m, QuantizedLinear) and m.kind != quantize:
            raise ValueError(f"{name} is already quantized as {m.kind}, cannot apply LoRA with quantize={quantize!r}")
    model.requires_grad_(False)
    for name, m in chosen.items():
        if quantize and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_EXACT:
            m = quantize_linear(m, quantize)
        _replace(model, name, LoRALinear(m, r, alpha, dropout))
    model.lora_config = LoRAConfig(r, alpha, dropout, targets, quantize)
    return model


def merge_lora(model):
    """Fold every adapter into its base, in place, leaving plain nn.Linears (a quantized base is dequantized to
    its compute dtype first, so the merged model is full size). Returns the model, now savable with
    save_pretrained."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to merge")
    for name, layer in layers.items():
        _replace(model, name, layer.merged())
    del model.lora_config
    return model


def lora_parameters(model):
    """The trainable LoRA tensors (every lora_A.weight and lora_B.weight), in module order."""
    return [p for layer in _lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def make_optimizer(params, lr, weight_decay=0.0, kind="adamw", betas=(0.9, 0.999)):
    """AdamW in fp32 ("adamw"), or bitsandbytes' 8-bit AdamW ("adamw8bit", CPU and CUDA) and its paged variant
    ("paged_adamw8bit": optimizer state in CUDA unified memory; on CPU there is nothing to page, so it is
    the plain 8-bit one). params: tensors or param-group dicts."""
    params = list(params)
    flat = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if not flat:
        raise ValueError("make_optimizer got no parameters to optimize")
    if kind == "adamw":  # fused: one pass over the tensors (the for-loop kind took 15% of a small LM's step)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in flat)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    if kind in ("adamw8bit", "paged_adamw8bit"):
        import bitsandbytes as bnb
        paged = kind == "paged_adamw8bit" and all(p.is_cuda for p in flat)
        cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer kind {kind!r}; use 'adamw', 'adamw8bit' or 'paged_adamw8bit'")


# ---- PEFT-layout adapter files ------------------------------------------------------------------------

def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write adapter_config.json + adapter_model.safetensors exactly as peft writes them for PhiForCausalLM.
    model is the Phi itself (tensor names are relative to it); only LoRA tensors are saved."""
    from safetensors.torch import save

    config = getattr(model, "lora_config", None)
    layers = _lora_layers(model)
    if config is None or not layers:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora first")
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight.detach().contiguous().cpu()
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None),
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "use_rslora": False,
        "use_dora": False, "lora_bias": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"})),
                       (ADAPTER_CONFIG, json.dumps(peft_config, indent=2).encode())):
        with open(out / (name + ".tmp"), "wb") as f:  # written as any file the user writes (save_file makes 0600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(out / (name + ".tmp"), out / name)


def read_adapter_config(adapter_dir):
    """(r, alpha, dropout, targets) from a PEFT adapter_config.json, refusing LoRA variants not implemented here."""
    folder = Path(adapter_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {name}")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type is {config.get('peft_type')!r}, only 'LORA' is supported")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "modules_to_save",
                               "rank_pattern", "alpha_pattern", "layers_to_transform", "layer_replication",
                               "exclude_modules", "trainable_token_indices", "target_parameters") if config.get(k)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{folder / ADAPTER_CONFIG} uses LoRA options not supported here: {', '.join(unsupported)}")
    targets = config.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{folder / ADAPTER_CONFIG}: target_modules must be a list of module names, got {targets!r}")
    return config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), tuple(sorted(targets))


def load_adapter(model, adapter_dir, *, quantize=None):
    """Load a PEFT-layout LoRA adapter into model (the Phi). A model without adapters gets apply_lora with the
    adapter's r/alpha/dropout/targets first (quantize is passed through); one with adapters must match them.
    Returns the model."""
    from safetensors import safe_open

    r, alpha, dropout, targets = read_adapter_config(adapter_dir)
    folder = Path(adapter_dir)
    existing = getattr(model, "lora_config", None)
    if existing is None:
        apply_lora(model, r=r, alpha=alpha, dropout=dropout, targets=targets, quantize=quantize)
    elif (existing.r, existing.alpha, tuple(sorted(existing.targets))) != (r, alpha, targets):
        raise ValueError(f"the model's LoRA (r={existing.r}, alpha={existing.alpha}, targets={sorted(existing.targets)}) "
                         f"differs from the adapter in {folder} (r={r}, alpha={alpha}, targets={list(targets)})")
    params, optional = {}, {}
    for name, layer in _lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            params[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).weight
        if name.rsplit(".", 1)[-1] in KEEP_EXACT:  # PEFT also saves an adapted output head's own weights
            optional.update({f"{PEFT_PREFIX}{name}.base_layer.{k}": v for k, v in layer.base_layer.named_parameters()})
    with safe_open(folder / ADAPTER_WEIGHTS, framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    params.update({k: v for k, v in optional.items() if k in tensors})
    for name in tensors:
        if name not in params:
            raise ValueError(f"adapter tensor '{name}' in {folder} has no place in this model")
    for name, p in params.items():
        if name not in tensors:
            raise ValueError(f"adapter in {folder} is missing tensor '{name}'")
        if tensors[name].shape != p.shape:
            raise ValueError(f"adapter tensor '{name}' has shape {tuple(tensors[name].shape)} but this model needs "
                             f"{tuple(p.shape)}: the adapter was made for another base model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    return model
