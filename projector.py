"""
From CLIP features to the language model's input: the projector, and splicing projected image features into a
batch of token embeddings in place of IMAGE_TOKEN_ID placeholders (LLaVA style).

Projector kinds (build_projector(kind, vision_dim, lm_dim)):
    linear               one Linear (LLaVA-1)
    mlp2x_gelu           Linear - GELU - Linear (LLaVA-1.5); mlpNx_gelu has N Linear layers
    pool2x2_mlp2x_gelu   2x2 average pool over the square patch grid (576 -> 144 tokens), then mlp2x_gelu
A Projector is an nn.Sequential of its layers, so parameter names are LLaVA's mm_projector names without the
prefix: `0.weight`, `0.bias`, `2.weight`, `2.bias` (the pooling has no parameters and is not a layer).
save_projector writes them as `mm_projector.0.weight`, ... in projector.safetensors, with the kind and sizes in
the file's metadata. Projectors are never quantized.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IMAGE_TOKEN_ID = -200  # same value as tokenizer.IMAGE_TOKEN_ID (LLaVA's convention); this file imports only torch
IGNORE_INDEX = -100
KIND = re.compile(r"(?:pool(\d+)x\1_)?(linear|mlp(\d+)x_gelu)")


def parse_kind(kind):
    """'pool2x2_mlp2x_gelu' -> (pool=2, n_linear=2); 'linear' -> (1, 1)."""
    m = KIND.fullmatch(kind) if isinstance(kind, str) else None
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1) or (m.group(1) and int(m.group(1)) < 2):
        raise ValueError(f"unknown projector kind {kind!r}; use linear, mlp2x_gelu or pool2x2_mlp2x_gelu")
    return int(m.group(1) or 1), 1 if m.group(2) == "linear" else int(m.group(3))


def num_image_tokens(kind, num_patches):
    """How many LM positions one image takes after this projector (576 CLIP patches -> 576, or 144 pooled)."""
    pool, _ = parse_kind(kind)
    grid = math.isqrt(num_patches)
    if pool > 1:
        if grid * grid != num_patches or grid % pool:
            raise ValueError(f"{kind} needs a square patch grid whose side divides by {pool}; "
                             f"got {num_patches} patches")
        return (grid // pool) ** 2
    return num_patches


def pool_patches(x, pool):
    """(..., N, D) features of a square grid -> (..., N / pool^2, D) by average pooling pool x pool neighbours."""
    *lead, n, d = x.shape
    grid = math.isqrt(n)
    if grid * grid != n or grid % pool:
        raise ValueError(f"cannot {pool}x{pool}-pool {n} patches: need a square grid whose side divides by {pool}")
    grid_x = x.reshape(-1, grid, grid, d).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(grid_x, pool)
    return pooled.flatten(2).transpose(1, 2).reshape(*lead, (grid // pool) ** 2, d)


class Projector(nn.Sequential):
    def __init__(self, kind, vision_dim, lm_dim):
        pool, n_linear = parse_kind(kind)
        layers = [nn.Linear(vision_dim, lm_dim)]
        for _ in range(n_linear - 1):
            layers += [nn.GELU(), nn.Linear(lm_dim, lm_dim)]
        super().__init__(*layers)
        self.kind, self.pool, self.vision_dim, self.lm_dim = kind, pool, vision_dim, lm_dim

    def forward(self, features):
        """(N, vision_dim) or (B, N, vision_dim) -> (N', lm_dim) or (B, N', lm_dim)."""
        if features.shape[-1] != self.vision_dim:
            raise ValueError(f"projector expects features of width {self.vision_dim}, got {tuple(features.shape)}")
        if self.pool > 1:
            features = pool_patches(features, self.pool)
        return super().forward(features.to(self[0].weight.dtype))


def build_projector(kind, vision_dim, lm_dim):
    return Projector(kind, vision_dim, lm_dim)


def save_projector(projector, path):
    """projector.safetensors: mm_projector.* tensors, kind and sizes in the metadata; written atomically."""
    import os

    from safetensors.torch import save

    tensors = {f"mm_projector.{k}": v.detach().contiguous().cpu() for k, v in projector.state_dict().items()}
    meta = {"kind": projector.kind, "vision_dim": str(projector.vision_dim), "lm_dim": str(projector.lm_dim)}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:  # written as any file the user writes (save_file makes 0600)
        f.write(save(tensors, metadata=meta))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_projector(path, *, dtype=None, device="cpu"):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if not {"kind", "vision_dim", "lm_dim"} <= set(meta):
            raise ValueError(f"{path} lacks the projector metadata (kind, vision_dim, lm_dim); "
                             "was it written by save_projector?")
        state = {k.removeprefix("mm_projector."): f.get_tensor(k) for k in f.keys()}
    projector = Projector(meta["kind"], int(meta["vision_dim"]), int(meta["lm_dim"]))
    expected = projector.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"{path} holds {sorted(state)}, but a {meta['kind']} projector has {sorted(expected)}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"tensor 'mm_projector.{k}' in {path} has shape {tuple(v.shape)}, "
                             f"expected {tuple(expected[k].shape)}")
    projector.load_state_dict(state)
    return projector.to(device=device, dtype=dtype)


# ---- splicing ------------------------------------------------------------------------------------------


@dataclass
class Spliced:
    inputs_embeds: torch.Tensor    # (B, T, D)
    attention_mask: torch.Tensor   # (B, T) bool, False on padding
    targets: torch.Tensor | None   # (B, T) next-token targets aligned with logits, -100 where nothing is learned
    position_ids: torch.Tensor     # (B, T) 0, 1, 2, ... from each row's first real position (0 on padding)
    image_spans: list              # per row: [(start, end), ...] positions of each kept image's features
    truncated: list                # per row: True when max_len cut the row
    images_dropped: int            # images whose block did not fit under max_len (their features are unused)


def splice_image_features(input_ids, embed_fn, image_features, *, targets=None, pad_id=0, max_len=None,
                          padding_side="right", attention_mask=None):
    """Replace every IMAGE_TOKEN_ID in the token rows with that image's feature rows and pad into a batch.

    input_ids: list of id lists, or a (B, T) tensor (with attention_mask for its padding, if any).
    embed_fn: the token embedding (an nn.Embedding or any callable ids -> (n, D) embeddings).
    image_features: one (N_i, D) tensor per placeholder, in order of appearance across the whole batch.
    targets: per-token labels aligned with input_ids (the token id to learn, or -100 for prompt tokens);
        the returned targets are shifted for the model (targets[:, t] is the label of position t + 1) and are
        -100 on image, prompt and padding positions.
    max_len: rows longer than this are cut; a cut never splits an image: the whole image block and what follows
        it are dropped instead, and the row is reported in `truncated`.
    padding_side: "right" for training, "left" for batched generation.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    rows = as_rows(input_ids, attention_mask, "input_ids")
    label_rows = as_rows(targets, attention_mask, "targets") if targets is not None else None
    if label_rows is not None and [len(r) for r in label_rows] != [len(r) for r in rows]:
        raise ValueError("targets must have the same length as input_ids in every row")
    n_placeholders = sum(r.count(IMAGE_TOKEN_ID) for r in rows)
    if n_placeholders != len(image_features):
        raise ValueError(f"the batch has {n_placeholders} image placeholders but {len(image_features)} image features")

    text_ids = [t for r in rows for t in r if t != IMAGE_TOKEN_ID]
    probe = torch.tensor(text_ids + [pad_id], dtype=torch.long, device=embedding_device(embed_fn))
    text_embeds = embed_fn(probe)
    pad_embed, text_embeds = text_embeds[-1], text_embeds[:-1]
    dim, dtype = pad_embed.shape[-1], pad_embed.dtype
    for i, f in enumerate(image_features):
        if f.ndim != 2 or f.shape[1] != dim:
            raise ValueError(f"image features {i} must be (N, {dim}) to match the embeddings, got {tuple(f.shape)}")

    pieces, labels, spans, truncated = [], [], [], []
    text_at, image_at, dropped = 0, 0, 0
    for b, row in enumerate(rows):
        parts, row_labels, row_spans, length, cut = [], [], [], 0, False
        start = 0
        for j in range(len(row) + 1):  # split the row into text runs and images
            if j < len(row) and row[j] != IMAGE_TOKEN_ID:
                continue
            run = j - start
            if not cut and run:
                keep = run if max_len is None else min(run, max_len - length)
                cut = keep < run
                parts.append(text_embeds[text_at:text_at + keep])
                row_labels += label_rows[b][start:start + keep] if label_rows else [IGNORE_INDEX] * keep
                length += keep
            text_at += run
            if j < len(row):
                feats = image_features[image_at]
                image_at += 1
                if not cut and (max_len is None or length + len(feats) <= max_len):
                    parts.append(feats.to(device=pad_embed.device, dtype=dtype))
                    row_labels += [IGNORE_INDEX] * len(feats)
                    row_spans.append((length, length + len(feats)))
                    length += len(feats)
                else:
                    cut, dropped = True, dropped + 1
            start = j + 1
        if length == 0:
            raise ValueError(f"row {b} is empty after splicing (max_len={max_len})")
        pieces.append(torch.cat(parts) if len(parts) > 1 else parts[0])
        labels.append(row_labels)
        spans.append(row_spans)
        truncated.append(cut)

    T = max(len(p) for p in pieces)
    device = pad_embed.device
    embeds, mask, target_out = [], [], []
    for piece, row_labels, row_spans, b in zip(pieces, labels, spans, range(len(pieces))):
        n_pad = T - len(piece)
        padding = pad_embed.expand(n_pad, dim)
        left = padding_side == "left"
        embeds.append(torch.cat([padding, piece] if left else [piece, padding]))
        real = torch.ones(len(piece), dtype=torch.bool, device=device)
        none = torch.zeros(n_pad, dtype=torch.bool, device=device)
        mask.append(torch.cat([none, real] if left else [real, none]))
        shifted = row_labels[1:] + [IGNORE_INDEX]
        target_out.append([IGNORE_INDEX] * n_pad + shifted if left else shifted + [IGNORE_INDEX] * n_pad)
        if left:
            spans[b] = [(s + n_pad, e + n_pad) for s, e in row_spans]
    attention = torch.stack(mask)
    return Spliced(
        inputs_embeds=torch.stack(embeds),
        attention_mask=attention,
        targets=torch.tensor(target_out, dtype=torch.long, device=device) if label_rows is not None else None,
        position_ids=(attention.long().cumsum(-1) - 1).clamp(min=0),
        image_spans=spans,
        truncated=truncated,
        images_dropped=dropped,
    )


def as_rows(ids, attention_mask, name):
    """A (B, T) tensor (padding removed with attention_mask) or a list of id lists -> list of int lists."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 2:
            raise ValueError(f"{name} must be (B, T), got shape {tuple(ids.shape)}")
        if attention_mask is None:
            return ids.tolist()
        return [row[m.bool()].tolist() for row, m in zip(ids.cpu(), attention_mask.cpu())]
    if not isinstance(ids, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in ids):
        raise ValueError(f"{name} must be a (B, T) tensor or a list of id lists")
    return [[int(t) for t in r] for r in ids]


def embedding_device(embed_fn):
    weight = getattr(embed_fn, "weight", None)
    if weight is None and isinstance(embed_fn, nn.Module):
        weight = next(embed_fn.parameters(), None)
    return weight.device if weight is not None else torch.device("cpu")
