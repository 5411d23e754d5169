"""InsightEdit's bridging (Q-Former + BIM, IAA) and generation plumbing (decoupled attention,
the ``v_txt`` residual after ``conv_in``), at tiny sizes."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from torch.nn import functional as F

from models.components.bridging import ImageStream, TextStream, iaa_loss
from models.components.decoupled_attention import (
    add_after_conv_in,
    cross_attention_layers,
    guidance_image_tokens,
    image_tokens,
    install_decoupled_attention,
    pack_condition,
    set_image_scale,
)

B, R, H = 2, 5, 24  # batch, [MM] tokens, LLM width
Q, D = 7, 16  # queries, Q-Former width = UNet cross-attention width
C_CLIP, GRID = 12, 4  # CLIP patch width, patch grid
LATENT = 8
N_IMG = 3
N_CROSS = 4  # cross-attention layers of tiny_unet: 1 down, 1 mid, 2 up


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (on a loaded 2-core machine, two threads per op make
    the tiny UNet ~50x slower); restored afterwards for the rest of the session."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """8-channel UNet with cross-attention in a down block, the mid block and an up block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT,
        in_channels=8,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        cross_attention_dim=D,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_text_stream(seed: int = 0, **kw) -> TextStream:
    torch.manual_seed(seed)
    args = dict(
        num_queries=Q,
        hidden_size=D,
        num_attention_heads=2,
        intermediate_size=32,
        num_hidden_layers=2,
        dropout=0.0,
        image_feature_dim=C_CLIP,
        bim_hidden_size=16,
        bim_mlp_dim=32,
        bim_num_heads=2,
        unet_channels=16,
        latent_size=LATENT,
    )
    args.update(kw)
    return TextStream(H, **args)


def unet_inputs(batch: int = B, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 8, LATENT, LATENT, generator=g)
    t = torch.tensor([10, 500] * (batch // 2) + [10] * (batch % 2))
    return x, t


def test_shapes():
    stream = tiny_text_stream()
    h, feats = torch.randn(B, R, H), torch.randn(B, C_CLIP, GRID, GRID)
    out = stream(h, feats, mask=torch.ones(B, R, dtype=torch.long))
    assert out.q_prime.shape == (B, Q, D)
    assert out.f_txt.shape == (B, Q, D)
    assert out.v_txt.shape == (B, 16, LATENT, LATENT)
    # token layout [B, h*w, C] gives the same result as the grid layout
    tokens = feats.flatten(2).transpose(1, 2)
    torch.testing.assert_close(stream(h, tokens).f_txt, out.f_txt)
    # without BIM: f_txt is q' itself and there is no v_txt
    off = stream(h, use_bim=False)
    assert off.v_txt is None and off.f_txt is off.q_prime
    torch.testing.assert_close(off.q_prime, out.q_prime)
    # the encoder mask: hidden states at masked [MM] positions do not reach q'
    mask = torch.ones(B, R, dtype=torch.long)
    mask[:, -2:] = 0
    h2 = h.clone()
    h2[:, -2:] = torch.randn(B, 2, H)
    masked = stream.qformer_output(h, mask)
    torch.testing.assert_close(stream.qformer_output(h2, mask), masked)
    assert not torch.allclose(stream.qformer_output(h2), stream.qformer_output(h))
    # the rectangular latent of a non-square image
    assert stream(h, feats, latent_size=(4, 6)).v_txt.shape == (B, 16, 4, 6)

    image = ImageStream(H, image_embed_dim=10, cross_attention_dim=D, num_tokens=N_IMG)
    res = image(h)
    assert res.embeds.shape == (B, 10) and res.f_img.shape == (B, N_IMG, D)
    assert image.null_tokens(B).shape == (B, N_IMG, D)


def test_queries_and_positional_encoding_are_sams_and_blips():
    stream = tiny_text_stream()
    # 77-style learned queries: a parameter of the module, N(0, 0.02^2)
    big = TextStream(
        H,
        num_queries=200,
        hidden_size=64,
        num_attention_heads=2,
        intermediate_size=32,
        num_hidden_layers=2,
        use_bim=False,
    )
    assert abs(big.query.std().item() - 0.02) < 0.002
    # the Fourier matrix is a fixed buffer in the state dict, not a trainable parameter
    names = {n for n, _ in stream.named_parameters()}
    assert not any(n.startswith("pe.") for n in names)
    assert "pe.positional_embedding" in stream.state_dict()
    # SAM's encoding by hand: cell centre (x, y) in [0,1]^2 → [sin, cos](2π (2p-1) G)
    pe = stream.dense_positional_encoding(GRID, 3)
    g = stream.pe.positional_embedding
    i, j = 2, 1  # row y, column x
    p = torch.tensor([(j + 0.5) / 3, (i + 0.5) / GRID])
    z = 2 * math.pi * ((2 * p - 1) @ g)
    torch.testing.assert_close(pe[0, :, i, j], torch.cat([z.sin(), z.cos()]))


def test_bim_outputs_follow_smartedit():
    """f_txt = q' + 0.5 · Linear(queries_out), v_txt = Conv1x1(bilinear(keys_out)), recomputed
    from the plain two-way transformer with non-zero output heads."""
    stream = tiny_text_stream()
    torch.nn.init.normal_(stream.txt_out.weight)
    torch.nn.init.normal_(stream.img_out.weight)
    h, feats = torch.randn(B, R, H), torch.randn(B, C_CLIP, GRID, GRID)
    with torch.no_grad():
        out = stream(h, feats, latent_size=6)
        tokens = feats.flatten(2).transpose(1, 2) @ stream.image_in.weight.T + stream.image_in.bias
        grid = tokens.transpose(1, 2).reshape(B, 16, GRID, GRID)
        pe = stream.dense_positional_encoding(GRID, GRID).expand(B, -1, -1, -1)
        points = (out.q_prime @ stream.bim_in.weight.T + stream.bim_in.bias)[:, None]
        queries, keys = stream.bim(points, grid, pe, None)
        f_txt = out.q_prime + 0.5 * (queries[:, 0] @ stream.txt_out.weight.T)
        keys = keys[:, 0].transpose(1, 2).reshape(B, 16, GRID, GRID)
        up = F.interpolate(keys, size=(6, 6), mode="bilinear", align_corners=False)
        v_txt = F.conv2d(up, stream.img_out.weight)
    torch.testing.assert_close(out.f_txt, f_txt)
    torch.testing.assert_close(out.v_txt, v_txt)


def test_lambda_zero_equals_plain_unet_and_nonzero_changes_it():
    plain = tiny_unet()
    decoupled = tiny_unet()
    decoupled.load_state_dict(plain.state_dict())
    installed = install_decoupled_attention(decoupled, num_tokens=N_IMG, scale=0.0)
    assert len(installed) == len(cross_attention_layers(plain)) == N_CROSS
    x, t = unet_inputs()
    text = torch.randn(B, Q, D)
    f_img = torch.randn(B, N_IMG, D)
    with torch.no_grad():
        ref = plain(x, t, encoder_hidden_states=text).sample
        zero = decoupled(x, t, encoder_hidden_states=pack_condition(text, f_img)).sample
        assert torch.equal(zero, ref)
        assert set_image_scale(decoupled, 0.7) == N_CROSS
        changed = decoupled(x, t, encoder_hidden_states=pack_condition(text, f_img)).sample
    assert not torch.allclose(changed, ref, atol=1e-4)


def test_ip_projections_start_as_text_projections():
    unet = tiny_unet()
    install_decoupled_attention(unet, num_tokens=N_IMG)
    layers = cross_attention_layers(unet)
    for layer in layers.values():
        proc = layer.processor
        assert isinstance(proc, IPAdapterAttnProcessor2_0)
        assert torch.equal(proc.to_k_ip[0].weight, layer.to_k.weight)
        assert torch.equal(proc.to_v_ip[0].weight, layer.to_v.weight)
        assert proc.to_k_ip[0].weight.data_ptr() != layer.to_k.weight.data_ptr()  # a copy
    # self-attention keeps the default processor; the processors train and save with the UNet
    others = [m for m in unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert others and not any(isinstance(m.processor, IPAdapterAttnProcessor2_0) for m in others)
    keys = [k for k in unet.state_dict() if "to_k_ip" in k]
    assert len(keys) == N_CROSS
    # re-installing builds fresh processors (set_attn_processor empties its dict)
    again = install_decoupled_attention(unet, num_tokens=N_IMG)
    assert len(again) == N_CROSS


def test_decoupled_attention_matches_hand_computation():
    torch.manual_seed(0)
    heads, dim_head, query_dim = 2, 4, 8
    attn = Attention(query_dim, cross_attention_dim=D, heads=heads, dim_head=dim_head).eval()
    proc = IPAdapterAttnProcessor2_0(heads * dim_head, D, num_tokens=(N_IMG,), scale=0.6)
    torch.nn.init.normal_(proc.to_k_ip[0].weight)
    torch.nn.init.normal_(proc.to_v_ip[0].weight)
    attn.set_processor(proc)
    x, text, img = torch.randn(B, 6, query_dim), torch.randn(B, Q, D), torch.randn(B, N_IMG, D)
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=(text, [img]))

        def attend(q, k, v):  # per head: softmax(q kᵀ / √d) v, heads split by reshape
            q, k, v = (a.reshape(B, -1, heads, dim_head).permute(0, 2, 1, 3) for a in (q, k, v))
            w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)
            return (w @ v).permute(0, 2, 1, 3).reshape(B, -1, heads * dim_head)

        q = x @ attn.to_q.weight.T
        z = attend(q, text @ attn.to_k.weight.T, text @ attn.to_v.weight.T) + 0.6 * attend(
            q, img @ proc.to_k_ip[0].weight.T, img @ proc.to_v_ip[0].weight.T
        )
        ref = z @ attn.to_out[0].weight.T + attn.to_out[0].bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_zero_init_bim_and_conv_in_hook_then_learning():
    unet = tiny_unet()
    stream = tiny_text_stream()
    h, feats = torch.randn(B, R, H), torch.randn(B, C_CLIP, GRID, GRID)
    x, t = unet_inputs()
    out = stream(h, feats)
    assert torch.equal(out.f_txt, out.q_prime)
    assert torch.count_nonzero(out.v_txt) == 0
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=out.q_prime).sample
        with add_after_conv_in(unet, out.v_txt):
            hooked = unet(x, t, encoder_hidden_states=out.f_txt).sample
    assert torch.equal(hooked, ref)

    # one optimizer step on a loss through the UNet output moves the zero-initialised heads
    params = list(stream.parameters()) + list(unet.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn_like(ref)

    def step():
        opt.zero_grad()
        res = stream(h, feats)
        with add_after_conv_in(unet, res.v_txt):
            pred = unet(x, t, encoder_hidden_states=res.f_txt).sample
        F.mse_loss(pred, target).backward()
        return res

    step()
    assert stream.query.grad is not None and stream.query.grad.abs().sum() > 0
    assert stream.txt_out.weight.grad.abs().sum() > 0
    assert stream.img_out.weight.grad.abs().sum() > 0
    opt.step()
    assert stream.txt_out.weight.abs().sum() > 0 and stream.img_out.weight.abs().sum() > 0
    res = step()  # now the BIM transformer is on the gradient path too
    assert not torch.allclose(res.f_txt, res.q_prime)
    assert res.v_txt.abs().sum() > 0
    bim_grads = [p.grad for p in stream.bim.parameters()]
    assert all(g is not None for g in bim_grads) and sum(g.abs().sum() for g in bim_grads) > 0
    assert stream.bim_in.weight.grad.abs().sum() > 0
    assert stream.image_in.weight.grad.abs().sum() > 0
    qformer_grads = [p.grad for p in stream.qformer.parameters() if p.grad is not None]
    assert qformer_grads and sum(g.abs().sum() for g in qformer_grads) > 0
    assert stream.query.grad.abs().sum() > 0


def test_conv_in_hook_adds_feature_and_tiles_guidance_batches():
    unet = tiny_unet()
    x, _ = unet_inputs(batch=3 * B)
    v = torch.randn(B, 16, LATENT, LATENT)
    with torch.no_grad():
        plain = unet.conv_in(x)
        with add_after_conv_in(unet, v):
            hooked = unet.conv_in(x)
        after = unet.conv_in(x)
    torch.testing.assert_close(hooked, plain + torch.cat([v, v, v]))
    assert torch.equal(after, plain)  # the hook is gone after the block
    with add_after_conv_in(unet, None), torch.no_grad():
        assert torch.equal(unet.conv_in(x), plain)
    with pytest.raises(ValueError), add_after_conv_in(unet, v[:, :8]), torch.no_grad():
        unet.conv_in(x)


def test_guidance_branches_and_image_tokens_hook():
    unet = tiny_unet()
    install_decoupled_attention(unet, num_tokens=N_IMG, scale=1.0)
    image = ImageStream(H, image_embed_dim=10, cross_attention_dim=D, num_tokens=N_IMG)
    f_img = image(torch.randn(B, R, H)).f_img
    null = image.null_tokens()
    with torch.no_grad():
        torch.testing.assert_close(null[0], image.projection(torch.zeros(1, 10))[0])
        tokens = guidance_image_tokens(f_img, null)
    assert tokens.shape == (3 * B, N_IMG, D)
    assert torch.equal(tokens[:B], f_img)
    assert torch.equal(tokens[B:], null.expand(2 * B, -1, -1))

    # the pre-hook turns a plain-tensor call (EditDiffusion's) into the (text, [img]) call
    x, t = unet_inputs(batch=3 * B)
    text = torch.randn(3 * B, Q, D)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=(text, [tokens])).sample
        with image_tokens(unet, tokens):
            hooked = unet(x, t, encoder_hidden_states=text, return_dict=False)[0]
            positional = unet(x, t, text).sample
    assert torch.equal(hooked, ref) and torch.equal(positional, ref)


def test_iaa_loss_by_hand_and_mapper_learns():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # (1 + 4 + 4 + 9) / 4 elements
    assert iaa_loss(pred, target).item() == pytest.approx(4.5)
    with pytest.raises(ValueError):
        iaa_loss(pred, target[:1])

    torch.manual_seed(0)
    image = ImageStream(H, image_embed_dim=10, cross_attention_dim=D, num_tokens=N_IMG)
    h = torch.randn(8, R, H)
    mask = torch.ones(8, R)
    mask[:, -1] = 0
    clip = torch.randn(8, 10)
    # masked mean pooling = the mean over the kept tokens
    torch.testing.assert_close(image.map(h, mask), image.mapper(h[:, :-1].mean(1)))
    opt = torch.optim.Adam(image.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = iaa_loss(image.map(h, mask), clip)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_standardize_h_reads_each_slot_standardised_over_the_batch():
    """``standardize_h`` (the tiny preset's): in training the Q-Former reads h with each feature
    of each [MM] slot at zero mean and unit variance over the batch, so a per-slot shift or scale
    shared by all samples changes nothing; at evaluation it uses the running statistics, which
    the checkpoint keeps."""
    r = 3
    stream = tiny_text_stream(standardize_h=True, num_tokens=r).train()
    plain = tiny_text_stream(standardize_h=False).train()
    assert plain.h_norm is None and not any("h_norm" in k for k in plain.state_dict())
    h = torch.randn(5, r, H, generator=torch.Generator().manual_seed(0))
    mean, var = h.mean(0, keepdim=True), h.var(0, unbiased=False, keepdim=True)
    standardised = (h - mean) / torch.sqrt(var + 1e-5)
    # the same Q-Former on h standardised by hand, slot by slot
    plain.load_state_dict({k: v for k, v in stream.state_dict().items() if "h_norm" not in k})
    torch.testing.assert_close(stream.qformer_output(h), plain.qformer_output(standardised))
    slot_shift = torch.tensor([5.0, -2.0, 0.5]).view(1, r, 1)
    torch.testing.assert_close(stream.qformer_output(slot_shift + 3.0 * h), stream.qformer_output(h))
    assert {"h_norm.running_mean", "h_norm.running_var"} <= set(stream.state_dict())
    stream.eval()
    running_mean = stream.h_norm.running_mean.view(1, r, H)
    running_var = stream.h_norm.running_var.view(1, r, H)
    by_hand = (h - running_mean) / torch.sqrt(running_var + 1e-5)
    torch.testing.assert_close(stream.qformer_output(h), plain.eval().qformer_output(by_hand))
    with pytest.raises(ValueError, match="3 \\[MM\\] slots, h has 2"):
        stream.qformer_output(h[:, :2])
    with pytest.raises(ValueError, match="needs num_tokens"):
        tiny_text_stream(standardize_h=True)
