"""MMIG's components: attention losses (Eqs. 16-20), MM-Adapter (Eq. 6), MMSM (Eqs. 9-13).

References are hand-computed values on small tensors or re-computations with plain torch ops.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from models.components.attention_losses import (
    background_loss,
    blend_embeddings,
    concept_maps,
    foreground_loss,
    install_recording,
    resize_mask,
    retention_loss,
    segregation_loss,
)
from models.components.mm_adapter import (
    IMAGE_TEXT,
    TEXT_ONLY,
    adapter_parameters,
    decoder_layers,
    insert_mm_adapters,
)
from models.components.mmsm import MMSM, MMSMHook, UNetFeatureHook, mmsm_loss

# ------------------------------------------------------------------ L_AS (Eq. 19)


def test_segregation_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 4, generator=g)
    same = torch.stack([a, a, a])  # 3 concepts -> 3 pairs
    assert segregation_loss(same).item() == pytest.approx(1.5, abs=1e-6)
    left = torch.zeros(4, 4)
    left[:, :2] = torch.rand(4, 2, generator=g)
    right = torch.zeros(4, 4)
    right[:, 2:] = torch.rand(4, 2, generator=g)
    assert segregation_loss(torch.stack([left, right])).item() == 0.0
    # the batch mean: one identical pair (0.5) and one disjoint pair (0)
    batch = torch.stack([torch.stack([a, a]), torch.stack([left, right])])
    assert segregation_loss(batch).item() == pytest.approx(0.25, abs=1e-6)


def test_segregation_hand_example():
    a1 = torch.tensor([[0.4, 0.1], [0.3, 0.2]])
    a2 = torch.tensor([[0.1, 0.2], [0.3, 0.4]])
    # min = [[.1, .1], [.3, .2]] -> 0.7; sum(a1 + a2) = 2.0
    assert segregation_loss(torch.stack([a1, a2])).item() == pytest.approx(0.35, abs=1e-6)
    # the pair order does not matter, and two all-zero maps stay defined
    assert segregation_loss(torch.stack([a2, a1])).item() == pytest.approx(0.35, abs=1e-6)
    assert segregation_loss(torch.zeros(2, 2, 2)).item() == 0.0


# ------------------------------------------------------------------ L_AR (Eq. 20)


def test_retention_identical_binary_maps():
    g = torch.Generator().manual_seed(1)
    maps = (torch.rand(3, 5, 5, generator=g) > 0.5).float()
    maps[:, 0, 0] = 1.0  # no empty map
    loss = retention_loss(maps, maps.clone(), threshold=0.5)
    assert loss.item() == pytest.approx(1.5, abs=1e-6)  # 0.5 per concept
    loss = retention_loss(maps, maps.clone(), threshold=0.5, relative=False)
    assert loss.item() == pytest.approx(1.5, abs=1e-6)


def test_retention_all_zero_defined():
    zeros = torch.zeros(2, 3, 3, requires_grad=True)
    loss = retention_loss(torch.zeros(2, 3, 3), zeros, threshold=0.5)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2.0)  # 1 per concept
    loss.backward()
    assert torch.isfinite(zeros.grad).all()


def test_retention_hand_example():
    prev = torch.tensor([[[0.2, 0.9], [0.6, 0.1]]])
    now = torch.tensor([[[0.3, 0.5], [0.4, 0.2]]], requires_grad=True)
    # relative (divided by max 0.9): [.22, 1, .67, .11] >= 0.65 -> B = [0, 1, 1, 0]
    # min(now, B) = 0.5 + 0.4 = 0.9; sum(now + B) = 1.4 + 2 = 3.4
    loss = retention_loss(prev, now, threshold=0.65)
    assert loss.item() == pytest.approx(1 - 0.9 / 3.4, abs=1e-6)
    # absolute: 0.6 < 0.65 -> B = [0, 1, 0, 0]; min = 0.5, sum = 1.4 + 1 = 2.4
    absolute = retention_loss(prev, now, threshold=0.65, relative=False)
    assert absolute.item() == pytest.approx(1 - 0.5 / 2.4, abs=1e-6)
    # B is a proxy ground truth: no gradient reaches the previous step's maps
    prev_grad = prev.clone().requires_grad_(True)
    retention_loss(prev_grad, now, threshold=0.65).backward()
    assert prev_grad.grad is None and now.grad.abs().sum() > 0


# ------------------------------------------------------------------ L_fg, L_bg, blend


def test_foreground_background_half_mask():
    # residual 1 on the left half of the latent, 2 on the right; 4 channels, 4x4 latent
    target = torch.zeros(2, 4, 4, 4)
    pred = torch.ones(2, 4, 4, 4)
    pred[..., 2:] = 2.0
    pred[1] *= 3.0  # second sample: residuals 3 and 6
    mask = torch.zeros(2, 1, 8, 8)  # image-size mask, object on the left half
    mask[..., :4] = 1.0
    # L_fg: sqrt(4 ch * 8 positions * r^2) = r * sqrt(32), averaged over the batch
    fg = foreground_loss(target, pred, mask)
    assert fg.item() == pytest.approx((1 + 3) / 2 * math.sqrt(32), rel=1e-6)
    # L_bg uses 1 - M_r: the right half
    bg = background_loss(target, pred, mask)
    assert bg.item() == pytest.approx((2 + 6) / 2 * math.sqrt(32), rel=1e-6)
    # unsquared: doubling the residual doubles the loss
    assert foreground_loss(target, 2 * pred, mask).item() == pytest.approx(2 * fg.item(), rel=1e-6)
    assert resize_mask(mask, (4, 4)).unique().tolist() == [0.0, 1.0]
    assert resize_mask(mask[:, 0], (4, 4)).shape == (2, 1, 4, 4)


def test_blend_embeddings():
    a, b = torch.full((1, 3, 4), 2.0), torch.full((1, 3, 4), -1.0)
    assert torch.allclose(blend_embeddings(a, b), torch.full((1, 3, 4), 0.7 * 2 - 0.3))
    assert torch.allclose(blend_embeddings(a, b, alpha=0.25), torch.full((1, 3, 4), 0.5 - 0.75))


# ------------------------------------------------------------------ MM-Adapter (Eq. 6)


def _llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


IDS = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 7, 3, 30, 2, 40]])


def test_mm_adapter_identity_at_init_then_not():
    plain = _llama()
    model = copy.deepcopy(plain)
    adapters = insert_mm_adapters(model)
    model.eval()
    with torch.no_grad():
        ref = plain(IDS).logits
        assert torch.equal(model(IDS).logits, ref)
        with adapters.modality(torch.tensor([TEXT_ONLY, IMAGE_TEXT])):
            assert torch.equal(model(IDS).logits, ref)
        # cached greedy decoding is unchanged as well
        out_plain = plain.generate(IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(IDS, max_new_tokens=4, do_sample=False), out_plain)
        torch.nn.init.normal_(adapters.adapters[0].up1.weight, std=0.5)
        torch.nn.init.normal_(adapters.adapters[1].up2.weight, std=0.5)
        assert not torch.allclose(model(IDS).logits, ref, atol=1e-3)
    adapters.remove()
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


def test_mm_adapter_trainable_set_and_router():
    model = _llama()
    adapters = insert_mm_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, p in model.named_parameters() if "mm_adapter" in n}
    assert trainable == expected
    # per block: down (w, b), up1 (w, b), up2 (w, b), router (w, b); plus the modality embedding
    assert len(adapter_parameters(model)) == 2 * 8 + 1
    assert {id(p) for p in adapter_parameters(model)} == {
        id(p) for n, p in model.named_parameters() if n in trainable
    }
    with adapters.modality(torch.tensor([TEXT_ONLY, IMAGE_TEXT])), torch.no_grad():
        model(IDS)
    for w in adapters.last_weights:
        assert w.shape == (2, 2)
        assert torch.allclose(w.sum(-1), torch.ones(2))
        assert not torch.allclose(w[0], w[1])  # the modality chooses the routing
    # an L_MMT step gives gradients to the adapters only
    model.train()
    torch.nn.init.normal_(adapters.adapters[0].up1.weight, std=0.1)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in adapter_parameters(model))
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_mm_adapter_equation_and_placement():
    """The attention input is Eq. 6 of the normed block input (plain-ops re-computation), and the
    block's residual adds the un-adapted input."""
    model = _llama()
    adapters = insert_mm_adapters(model)
    model.eval()
    ad = adapters.adapters[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (ad.up1.weight, ad.up2.weight, ad.up1.bias, ad.up2.bias):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layer = decoder_layers(model)[0]
    seen = {}
    layer.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    layer.self_attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(attn_in=k.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    layer.self_attn.register_forward_hook(
        lambda m, a, k, out: seen.update(attn_out=out[0]), with_kwargs=True
    )
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(mid=a[0]))
    with torch.no_grad(), adapters.modality(IMAGE_TEXT):
        model(IDS)
        norm = layer.input_layernorm
        z = (
            norm.weight
            * seen["x"]
            * torch.rsqrt(seen["x"].pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        )
        emb = model.mm_adapter_modality.weight[IMAGE_TEXT]
        z0 = norm.weight * emb * torch.rsqrt(emb.pow(2).mean() + norm.variance_epsilon)
        w = torch.softmax((ad.router.weight @ z0 + ad.router.bias) / 10.0, -1)
        h = z @ ad.down.weight[:, :, 0].T + ad.down.bias  # [B, T, 8]

        def grouped(conv, h):  # 2 groups: hidden 0..3 -> out 0..15, hidden 4..7 -> out 16..31
            wt = conv.weight[:, :, 0]
            first = h[..., :4] @ wt[:16].T
            second = h[..., 4:] @ wt[16:].T
            return torch.cat([first, second], -1) + conv.bias

        expected = z + w[0] * grouped(ad.up1, h) + w[1] * grouped(ad.up2, h)
        assert torch.allclose(seen["attn_in"], expected, atol=1e-5)
        assert torch.allclose(seen["mid"], seen["x"] + seen["attn_out"], atol=1e-6)


def test_mm_adapter_llava_language_model_only():
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
        ),
        image_token_id=63,
    )
    plain = LlavaForConditionalGeneration(config).eval()
    model = copy.deepcopy(plain)
    adapters = insert_mm_adapters(model)
    assert len(adapters.adapters) == 3
    names = [n for n, _ in model.named_modules() if n.endswith("mm_adapter")]
    assert all(n.startswith("model.language_model.layers.") for n in names) and len(names) == 3
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert adapters.default_modality == IMAGE_TEXT
    assert insert_mm_adapters(_llama()).default_modality == TEXT_ONLY


# ------------------------------------------------------------------ recording processor


def _unet(seed: int = 0) -> UNet2DConditionModel:
    """Cross-attention at 8x8 (down 0, up 1) and 4x4 (mid)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=12,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def _unet_inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 500]),
        torch.randn(2, 5, 12, generator=g),
    )


LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


def test_recording_output_unchanged_and_maps_by_hand():
    plain = _unet()
    unet = copy.deepcopy(plain)
    x, t, text = _unet_inputs()
    seen = {}
    attn = unet.get_submodule(LAYER)
    attn.register_forward_pre_hook(
        lambda m, a, k: seen.update(h=a[0], e=k["encoder_hidden_states"]), with_kwargs=True
    )
    store = install_recording(unet, resolution=None)
    with torch.no_grad():
        ref = plain(x, t, text).sample
        assert torch.allclose(unet(x, t, text).sample, ref, atol=1e-6)  # recording off
        assert not store.maps
        with store.record():
            out = unet(x, t, text).sample
        assert torch.allclose(out, ref, atol=1e-6)  # recording on
    assert set(store.maps) == {
        LAYER,
        "mid_block.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    }
    # softmax(Q K^T / sqrt(d)) by hand, heads averaged, as [B, L, 8, 8]
    heads, dh = attn.heads, attn.to_q.out_features // attn.heads
    q = (seen["h"] @ attn.to_q.weight.T).unflatten(-1, (heads, dh))  # [B, N, heads, dh]
    k = (seen["e"] @ attn.to_k.weight.T).unflatten(-1, (heads, dh))  # [B, L, heads, dh]
    probs = torch.softmax(torch.einsum("bnhd,blhd->bhnl", q, k) / math.sqrt(dh), -1).mean(1)
    expected = probs.transpose(1, 2).reshape(2, 5, 8, 8)
    assert torch.allclose(store.maps[LAYER], expected, atol=1e-6)
    assert torch.allclose(store.maps[LAYER].sum(1), torch.ones(2, 8, 8), atol=1e-5)
    store.remove()
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_recording_resolution_aggregate_and_gradients():
    unet = _unet()
    x, t, text = _unet_inputs()
    store = install_recording(unet, resolution=8)
    with store.record():
        unet(x, t, text)
    assert len(store.maps) == 3  # the three 8x8 layers, not the 4x4 mid block
    maps = list(store.maps.values())
    agg = store.aggregate()
    assert torch.allclose(agg, (maps[0] + maps[1] + maps[2]) / 3)
    # raw selection = the chosen tokens' maps
    raw = concept_maps(agg, [1, 3], softmax_scale=None, smooth_sigma=None)
    assert torch.equal(raw, agg[:, [1, 3]])
    # Attend-and-Excite processing by hand: softmax(100 * maps[:, 1:4]) over tokens, 3x3 Gaussian
    per_sample = torch.tensor([[1, 2], [3, 1]])
    got = concept_maps(agg, per_sample, last_token=4)
    soft = torch.softmax(agg[:, 1:4] * 100, 1)
    picked = torch.stack([soft[0, [0, 1]], soft[1, [2, 0]]])
    g1 = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 0.5**2))
    kernel = torch.outer(g1, g1) / torch.outer(g1, g1).sum()
    smoothed = F.conv2d(
        F.pad(picked.reshape(4, 1, 8, 8), (1, 1, 1, 1), mode="reflect"), kernel[None, None]
    )
    assert torch.allclose(got, smoothed.reshape(2, 2, 8, 8), atol=1e-6)
    # the losses on recorded maps reach the UNet's cross-attention weights
    (segregation_loss(got) + retention_loss(got, got)).backward()
    assert unet.get_submodule(LAYER).to_q.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        install_recording(_unet_no_cross())
    # SD's 16x16 default finds no layer in this UNet: nothing is recorded, and aggregate says so
    store.remove()
    store16 = install_recording(unet)
    with store16.record(), torch.no_grad():
        unet(x, t, text)
    assert not store16.maps
    with pytest.raises(RuntimeError, match="resolution 16"):
        store16.aggregate()


def _unet_no_cross() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=12,
        norm_num_groups=8,
    )


# ------------------------------------------------------------------ MMSM (Eqs. 9-13)


def _mmsm_inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    e0 = torch.randn(2, 5, 24, generator=g)
    e1 = torch.randn(2, 32, 4, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return e0, e1, mask


def test_mmsm_shapes_and_residual():
    torch.manual_seed(0)
    mmsm = MMSM(text_dim=24, feature_channels=32, dim=16, num_heads=2)
    e0, e1, mask = _mmsm_inputs()
    out = mmsm(e0, e1, mask)
    assert (
        out.e3.shape == (2, 5, 16) and out.e2.shape == (2, 16, 16) and out.e4.shape == (2, 16, 16)
    )
    assert out.e6.shape == e1.shape
    assert torch.equal(out.e6, e1)  # zero-initialised domain decoder
    with torch.no_grad():
        torch.nn.init.normal_(mmsm.domain_decoder[-1].weight)
        out = mmsm(e0, e1, mask)
        ln, lin = mmsm.domain_decoder
        dd = F.linear(F.layer_norm(out.e4, (16,), ln.weight, ln.bias), lin.weight, lin.bias)
        assert torch.allclose(out.e6 - e1, dd.transpose(1, 2).reshape(2, 32, 4, 4), atol=1e-5)
        # padding is ignored: changing padded text tokens changes nothing
        e0b = e0.clone()
        e0b[1, 3:] = 100.0
        again = mmsm(e0b, e1, mask)
        assert torch.allclose(again.e6, out.e6, atol=1e-5) and torch.allclose(again.loss, out.loss)


def test_mmsm_loss_hand_value():
    e3 = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # mean [2, 3]
    e2 = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]])  # mean [1, 1]
    assert mmsm_loss(e3, e2).item() == pytest.approx(0.5 * (1 + 4) / 2)
    mask = torch.tensor([[1, 0]])  # text mean [1, 2] -> diff [0, 1]
    assert mmsm_loss(e3, e2, mask).item() == pytest.approx(0.5 * 1 / 2)


def test_mmsm_loss_falls_with_adam():
    torch.manual_seed(0)
    mmsm = MMSM(text_dim=24, feature_channels=32, dim=16, num_heads=2)
    e0, e1, mask = _mmsm_inputs()
    opt = torch.optim.Adam(mmsm.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = mmsm(e0, e1, mask).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_unet_feature_hook_and_mmsm_hook():
    plain = _unet()
    unet = copy.deepcopy(plain)
    x, t, text = _unet_inputs()
    captured = UNetFeatureHook(unet)  # mid block, capture only
    with torch.no_grad():
        ref = plain(x, t, text).sample
        assert torch.equal(unet(x, t, text).sample, ref)
    assert captured.feature.shape == (2, unet.config.block_out_channels[-1], 4, 4)
    captured.remove()
    torch.manual_seed(0)
    mmsm = MMSM(text_dim=24, feature_channels=32, dim=16, num_heads=2)
    hook = MMSMHook(unet, mmsm)
    e0, _, mask = _mmsm_inputs()
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, ref)  # no text: block untouched
        hook.condition(e0, mask)
        assert torch.allclose(unet(x, t, text).sample, ref, atol=1e-6)  # zero decoder: e6 = e1
        assert torch.equal(hook.output.e6, hook.feature)
        torch.nn.init.normal_(mmsm.domain_decoder[-1].weight)
        changed = unet(x, t, text).sample
        assert not torch.allclose(changed, ref, atol=1e-3)
        # e_1 is the plain UNet's mid-block output (the hook sees it before replacing it)
        assert torch.allclose(hook.feature, captured_mid(plain, x, t, text), atol=1e-6)


def captured_mid(unet, x, t, text):
    """The plain UNet's mid-block output, through an independent hook."""
    seen = {}
    handle = unet.mid_block.register_forward_hook(lambda m, a, out: seen.update(out=out))
    unet(x, t, text)
    handle.remove()
    return seen["out"]
