"""
Tests of projector.py: projector shapes, names and files; splicing image features into token embeddings.
"""

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from projector import (IMAGE_TOKEN_ID, Projector, build_projector, load_projector, num_image_tokens, save_projector,
                       splice_image_features)

IMG = IMAGE_TOKEN_ID
D = 8


@pytest.mark.parametrize("kind,tokens,names", [
    ("linear", 576, ["0.bias", "0.weight"]),
    ("mlp2x_gelu", 576, ["0.bias", "0.weight", "2.bias", "2.weight"]),
    ("pool2x2_mlp2x_gelu", 144, ["0.bias", "0.weight", "2.bias", "2.weight"]),
])
def test_projector_shapes_and_names(kind, tokens, names):
    projector = build_projector(kind, 32, 48)
    assert sorted(projector.state_dict()) == names
    assert num_image_tokens(kind, 576) == tokens
    assert projector(torch.randn(2, 576, 32)).shape == (2, tokens, 48)
    assert projector(torch.randn(576, 32)).shape == (tokens, 48)


def test_mlp2x_gelu_is_linear_gelu_linear():
    projector = build_projector("mlp2x_gelu", 16, 24)
    reference = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 24))
    reference.load_state_dict(projector.state_dict())
    x = torch.randn(3, 10, 16)
    assert torch.equal(projector(x), reference(x))


def test_pooling_averages_2x2_neighbours():
    projector = build_projector("pool2x2_linear", 4, 4)
    with torch.no_grad():
        projector[0].weight.copy_(torch.eye(4))
        projector[0].bias.zero_()
    x = torch.randn(1, 16, 4)  # a 4x4 grid, row-major
    out = projector(x)
    assert out.shape == (1, 4, 4)
    assert torch.allclose(out[0, 0], x[0, [0, 1, 4, 5]].mean(0), atol=1e-6)
    assert torch.allclose(out[0, 3], x[0, [10, 11, 14, 15]].mean(0), atol=1e-6)


def test_projector_bad_inputs():
    with pytest.raises(ValueError, match="unknown projector kind"):
        build_projector("mlp2x_relu", 4, 4)
    with pytest.raises(ValueError, match="square"):
        num_image_tokens("pool2x2_mlp2x_gelu", 50)
    with pytest.raises(ValueError, match="square"):
        build_projector("pool2x2_mlp2x_gelu", 4, 4)(torch.randn(1, 49, 4))  # 7x7 grid
    with pytest.raises(ValueError, match="width 4"):
        build_projector("linear", 4, 4)(torch.randn(1, 16, 5))


def test_projector_file_roundtrip(tmp_path):
    projector = build_projector("pool2x2_mlp2x_gelu", 16, 24)
    path = tmp_path / "projector.safetensors"
    save_projector(projector, path)
    with safe_open(path, framework="pt") as f:
        assert sorted(f.keys()) == [f"mm_projector.{i}.{t}" for i in (0, 2) for t in ("bias", "weight")]
        assert f.metadata()["kind"] == "pool2x2_mlp2x_gelu"
    back = load_projector(path, dtype=torch.bfloat16)
    assert isinstance(back, Projector) and back.kind == projector.kind and back[0].weight.dtype == torch.bfloat16
    x = torch.randn(2, 64, 16)
    assert torch.allclose(back(x).float(), projector(x), atol=0.05)
    assert not list(tmp_path.glob("*.tmp"))


# ---- splicing ------------------------------------------------------------------------------------------


@pytest.fixture
def embed():
    torch.manual_seed(0)
    return nn.Embedding(100, D)


def feats(n, seed):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ids", [[IMG, 5, 6, 7], [5, 6, IMG, 7, 8], [5, 6, 7, IMG]])
def test_splice_places_image_at_start_middle_end(embed, ids):
    image = feats(3, 0)
    out = splice_image_features([ids], embed, [image])
    at = ids.index(IMG)
    text = [t for t in ids if t != IMG]
    assert out.inputs_embeds.shape == (1, len(ids) - 1 + 3, D)
    assert out.image_spans == [[(at, at + 3)]]
    emb = out.inputs_embeds[0]
    assert torch.equal(emb[at:at + 3], image)
    rest = torch.cat([emb[:at], emb[at + 3:]])
    assert torch.equal(rest, embed(torch.tensor(text)))
    assert out.attention_mask.all() and out.targets is None and out.truncated == [False]


def test_splice_two_images_targets_and_right_padding(embed):
    # prompt: 1 IMG 2 IMG 3 | answer: 4 5 ; the second row is text only
    ids = [[1, IMG, 2, IMG, 3, 4, 5], [7, 8]]
    labels = [[-100, -100, -100, -100, -100, 4, 5], [-100, 8]]
    a, b = feats(2, 1), feats(3, 2)
    out = splice_image_features(ids, embed, [a, b], targets=labels, pad_id=0)
    T = 7 - 2 + 2 + 3
    assert out.inputs_embeds.shape == (2, T, D) and out.targets.shape == (2, T)
    assert out.image_spans == [[(1, 3), (4, 7)], []]
    assert torch.equal(out.inputs_embeds[0, 1:3], a) and torch.equal(out.inputs_embeds[0, 4:7], b)
    # positions: 0:1 1-2:a 3:2 4-6:b 7:3 8:4 9:5 ; targets[t] is the label of position t + 1
    assert out.targets[0].tolist() == [-100] * 7 + [4, 5, -100]
    assert out.attention_mask[1].tolist() == [True, True] + [False] * (T - 2)
    assert out.targets[1].tolist() == [8] + [-100] * (T - 1)
    assert torch.equal(out.inputs_embeds[1, 2:], embed.weight[0].expand(T - 2, D))  # padding is pad_id's embedding
    assert out.position_ids[0].tolist() == list(range(T))


def test_splice_left_padding_for_generation(embed):
    ids = [[1, IMG, 2], [3, 4, 5, 6, 7, 8]]
    image = feats(4, 3)
    out = splice_image_features(ids, embed, [image], padding_side="left")
    assert out.inputs_embeds.shape == (2, 6, D)
    assert out.attention_mask.all()  # 1 + 4 + 1 = 6 = the text row: no padding
    out = splice_image_features([[1, IMG], [3, 4, 5, 6, 7, 8, 9]], embed, [image], padding_side="left")
    assert out.attention_mask[0].tolist() == [False, False, True, True, True, True, True]
    assert out.position_ids[0].tolist() == [0, 0, 0, 1, 2, 3, 4]
    assert out.image_spans[0] == [(3, 7)]
    assert torch.equal(out.inputs_embeds[0, 3:], image)


def test_splice_accepts_padded_tensor_ids(embed):
    ids = torch.tensor([[0, 0, 1, IMG, 2], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    image = feats(2, 4)
    out = splice_image_features(ids, embed, [image], attention_mask=mask)
    ref = splice_image_features([[1, IMG, 2], [3, 4, 5, 6, 7]], embed, [image])
    assert torch.equal(out.inputs_embeds, ref.inputs_embeds)


def test_splice_truncation_never_halves_an_image(embed):
    ids = [[1, 2, IMG, 3, 4], [1, 2, IMG, 3, 4], [1, 2, 3, 4, 5, 6, 7, 8]]
    labels = [[-100, -100, -100, 3, 4]] * 2 + [[1, 2, 3, 4, 5, 6, 7, 8]]
    images = [feats(4, 5), feats(4, 6)]
    out = splice_image_features(ids, embed, images, targets=labels, max_len=7)
    # row 0/1: 2 text + 4 image = 6 fits, then one of 3,4 ; row 2: 8 tokens cut to 7
    assert out.inputs_embeds.shape == (3, 7, D) and out.truncated == [True, True, True]
    assert out.images_dropped == 0 and out.image_spans[0] == [(2, 6)]
    assert out.targets[0].tolist() == [-100] * 5 + [3, -100]
    assert out.targets[2].tolist() == [2, 3, 4, 5, 6, 7, -100]

    out = splice_image_features(ids, embed, images, targets=labels, max_len=5)  # the image would be cut: drop it
    assert out.image_spans[:2] == [[], []] and out.images_dropped == 2
    assert out.attention_mask[:2].sum(1).tolist() == [2, 2] and out.truncated == [True, True, True]
    assert torch.equal(out.inputs_embeds[0, :2], embed(torch.tensor([1, 2])))

    out = splice_image_features(ids, embed, images, targets=labels, max_len=8)  # everything fits exactly
    assert out.truncated == [False, False, False] and out.images_dropped == 0


def test_splice_gradients_reach_the_projector(embed):
    projector = build_projector("mlp2x_gelu", 6, D)
    image = projector(torch.randn(3, 6))
    out = splice_image_features([[1, IMG, 2, 3]], embed, [image], targets=[[-100, -100, 2, 3]])
    out.inputs_embeds.sum().backward()
    assert projector[0].weight.grad is not None and projector[0].weight.grad.abs().sum() > 0


def test_splice_bad_inputs(embed):
    with pytest.raises(ValueError, match="2 image placeholders but 1"):
        splice_image_features([[1, IMG, IMG]], embed, [feats(2, 0)])
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        splice_image_features([[1, IMG]], embed, [torch.randn(2, 5)])
    with pytest.raises(ValueError, match="same length"):
        splice_image_features([[1, 2]], embed, [], targets=[[1]])
    with pytest.raises(ValueError, match="padding_side"):
        splice_image_features([[1, 2]], embed, [], padding_side="middle")
