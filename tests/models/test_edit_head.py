"""EditHead (MGIE Eq. 3): shapes, null condition, gradients, and an independent reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.components.edit_head import EditHead

H, N, B = 32, 8, 3
SIZES = dict(
    d_model=16,
    nhead=2,
    num_encoder_layers=2,
    num_decoder_layers=2,
    dim_feedforward=24,
    num_queries=5,
    output_dim=12,
)


def _head(seed: int = 0) -> EditHead:
    torch.manual_seed(seed)
    return EditHead(H, **SIZES)


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, H, generator=g), torch.randn(B, N, H, generator=g)


# ----------------------------------------------------------------- a hand-written reference


def _attention(q_in, kv_in, sd, prefix, heads):
    """Multi-head attention from the packed in_proj weights, as nn.MultiheadAttention packs them."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    d = q_in.shape[-1]
    q = q_in @ w[:d].T + b[:d]
    k = kv_in @ w[d : 2 * d].T + b[d : 2 * d]
    v = kv_in @ w[2 * d :].T + b[2 * d :]

    def split(x):  # [B, T, d] -> [B, heads, T, d/heads]
        return x.reshape(x.shape[0], x.shape[1], heads, d // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(q_in.shape)
    return out @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"])


def _ff(x, sd, prefix):
    h = F.relu(x @ sd[prefix + "linear1.weight"].T + sd[prefix + "linear1.bias"])
    return h @ sd[prefix + "linear2.weight"].T + sd[prefix + "linear2.bias"]


def _reference(sd, hidden, embeds, heads, n_enc, n_dec):
    """Pre-norm encoder-decoder Transformer written out from the state dict (released
    EditMapper: llm2hid -> nn.Transformer(norm_first=True) -> hid2feat)."""
    x = (hidden + embeds) @ sd["llm2hid.weight"].T + sd["llm2hid.bias"]
    for i in range(n_enc):
        p = f"mapper.encoder.layers.{i}."
        y = _ln(x, sd, p + "norm1.")
        x = x + _attention(y, y, sd, p + "self_attn.", heads)
        x = x + _ff(_ln(x, sd, p + "norm2."), sd, p)
    memory = _ln(x, sd, "mapper.encoder.norm.")
    t = sd["query"].expand(hidden.shape[0], -1, -1)
    for i in range(n_dec):
        p = f"mapper.decoder.layers.{i}."
        y = _ln(t, sd, p + "norm1.")
        t = t + _attention(y, y, sd, p + "self_attn.", heads)
        t = t + _attention(_ln(t, sd, p + "norm2."), memory, sd, p + "multihead_attn.", heads)
        t = t + _ff(_ln(t, sd, p + "norm3."), sd, p)
    t = _ln(t, sd, "mapper.decoder.norm.")
    return t @ sd["hid2feat.weight"].T + sd["hid2feat.bias"]


# ----------------------------------------------------------------- tests


def test_output_shape_and_defaults():
    head = _head()
    hidden, embeds = _inputs()
    assert head(hidden, embeds).shape == (B, SIZES["num_queries"], SIZES["output_dim"])
    released = EditHead()  # the released sizes: 4096 -> 512, 77 x 768
    assert released.llm2hid.weight.shape == (512, 4096)
    assert released.query.shape == (1, 77, 512)
    assert released.hid2feat.weight.shape == (768, 512)
    assert len(released.mapper.encoder.layers) == 4 and len(released.mapper.decoder.layers) == 4
    assert released.mapper.encoder.layers[0].linear1.out_features == 2048
    assert released.mapper.encoder.layers[0].self_attn.num_heads == 4


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_matches_hand_written_reference(mode):
    head = _head()
    getattr(head, mode)()  # eval takes nn.Transformer's fused fast path where it can
    hidden, embeds = _inputs()
    sd = {k: v.detach() for k, v in head.state_dict().items()}
    expected = _reference(sd, hidden, embeds, SIZES["nhead"], 2, 2)
    with torch.no_grad():
        got = head(hidden, embeds)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_broadcast_embeddings_and_dtype():
    head = _head()
    hidden, embeds = _inputs()
    shared = embeds[:1]
    expected = head(hidden, shared.expand(B, -1, -1))
    torch.testing.assert_close(head(hidden, shared), expected)
    torch.testing.assert_close(head(hidden, shared[0]), expected)
    # bf16 inputs (a bf16 MLLM) are cast to the head's dtype
    out = head(hidden.bfloat16(), embeds.bfloat16())
    assert out.dtype == torch.float32


def test_null_condition_is_forward_on_zero_hidden_states():
    head = _head()
    _, embeds = _inputs()
    null = head.null_condition(embeds)
    torch.testing.assert_close(null, head(torch.zeros_like(embeds), embeds))
    hidden, _ = _inputs(seed=5)
    assert not torch.allclose(null, head(hidden, embeds))


def test_gradients_reach_every_parameter_and_inputs():
    head = _head()
    hidden, embeds = _inputs()
    hidden.requires_grad_(True)
    embeds.requires_grad_(True)
    (head(hidden, embeds) ** 2).mean().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert hidden.grad.abs().sum() > 0 and embeds.grad.abs().sum() > 0


def test_deterministic_and_seeded():
    hidden, embeds = _inputs()
    a, b = _head(seed=3), _head(seed=3)
    torch.testing.assert_close(a(hidden, embeds), b(hidden, embeds), rtol=0, atol=0)
    torch.testing.assert_close(a(hidden, embeds), a(hidden, embeds), rtol=0, atol=0)
    assert not torch.allclose(_head(seed=4)(hidden, embeds), a(hidden, embeds))


def test_state_dict_round_trip_into_fresh_transformer():
    """A separately built head loaded with the state dict gives the same output."""
    head = _head(seed=0)
    other = _head(seed=9)
    hidden, embeds = _inputs()
    assert not torch.allclose(other(hidden, embeds), head(hidden, embeds))
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(hidden, embeds), head(hidden, embeds), rtol=0, atol=0)


def test_wrong_hidden_size_is_a_clear_error():
    head = _head()
    with pytest.raises(ValueError, match=r"llm_hidden_size"):
        head(torch.zeros(B, N, H + 1), torch.zeros(B, N, H + 1))
