"""Released-checkpoint conversion: fabricated tiny mllm.pt / unet.pt with the official key names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.components.edit_head import EditHead
from models.components.mgie_release import apply_release, load_release
from models.components.mllm import MLLM

N = 8
HEAD = dict(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=32)


class _ReleasedEditMapper(nn.Module):
    """apple/ml-mgie's ``EditMapper`` layout (attribute names, pre-norm nn.Transformer, a
    [1, 77, d] query), at tiny sizes: the naming of the official ``edit_head.*`` keys."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        d = HEAD["d_model"]
        self.llm2hid = nn.Linear(hidden, d)
        self.query = nn.Parameter(torch.randn(1, 77, d))
        self.mapper = nn.Transformer(
            batch_first=True,
            norm_first=True,
            d_model=d,
            nhead=HEAD["nhead"],
            num_encoder_layers=1,
            num_decoder_layers=1,
            dim_feedforward=HEAD["dim_feedforward"],
            dropout=0.0,
        )
        self.hid2feat = nn.Linear(d, out_dim)

    def forward(self, llm, emb):
        hid = self.llm2hid(llm + emb)
        return self.hid2feat(self.mapper(hid, self.query.repeat(llm.shape[0], 1, 1)))


class _ReleasedLlava(nn.Module):
    """The parts of ml-mgie's ``LlavaLlamaForCausalLM`` that ``extract_ckpt.ipynb`` keeps."""

    def __init__(self, vocab: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.edit_head = _ReleasedEditMapper(hidden, out_dim)


@pytest.fixture(scope="module")
def parts(tiny_dir):
    from diffusers import UNet2DConditionModel

    mllm = MLLM(str(tiny_dir / "llava"), num_img_tokens=N)
    unet = UNet2DConditionModel.from_pretrained(tiny_dir / "instruct-pix2pix", subfolder="unet")
    head = EditHead(mllm.hidden_size, output_dim=unet.config.cross_attention_dim, **HEAD)
    return mllm, head, unet


def _fabricate(parts, folder, *, emb: bool = True):
    """mllm.pt and unet.pt as extract_ckpt.ipynb writes them (fp16, official names)."""
    mllm, head, unet = parts
    torch.manual_seed(0)
    released = _ReleasedLlava(len(mllm.tokenizer), mllm.hidden_size, head.output_dim)
    mllm_state = {
        k: v.detach().half()
        for k, v in released.state_dict().items()
        if "embed_tokens" in k or "lm_head" in k or "edit_head" in k
    }
    if emb:
        mllm_state["emb"] = mllm_state["model.embed_tokens.weight"][-N:].unsqueeze(0).clone()
    unet_state = {k: torch.randn_like(v.float()).half() for k, v in unet.state_dict().items()}
    torch.save(mllm_state, folder / "mllm.pt")
    torch.save(unet_state, folder / "unet.pt")
    return released, mllm_state, unet_state


def test_official_key_names():
    """Spot checks of the names the released files use (facts from apple/ml-mgie)."""
    keys = set(_ReleasedLlava(20, 32, 64).state_dict())
    for key in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "edit_head.llm2hid.weight",
        "edit_head.query",
        "edit_head.mapper.encoder.layers.0.self_attn.in_proj_weight",
        "edit_head.mapper.encoder.norm.weight",
        "edit_head.mapper.decoder.layers.0.multihead_attn.out_proj.bias",
        "edit_head.mapper.decoder.norm.bias",
        "edit_head.hid2feat.bias",
    ]:
        assert key in keys, key
    ours = {"edit_head." + k for k in EditHead(32, output_dim=64, **HEAD).state_dict()}
    assert ours == {k for k in keys if k.startswith("edit_head.")}


def test_load_and_apply_copies_every_tensor(parts, tmp_path):
    mllm, head, unet = parts
    released, mllm_state, unet_state = _fabricate(parts, tmp_path)
    weights = load_release(str(tmp_path / "mllm.pt"), str(tmp_path / "unet.pt"))
    assert weights.img_embeds is not None and weights.unet is not None
    apply_release(mllm, head, unet, weights)

    expected_embed = mllm_state["model.embed_tokens.weight"].float()
    torch.testing.assert_close(mllm.embed_tokens.weight.detach(), expected_embed, rtol=0, atol=0)
    torch.testing.assert_close(
        mllm.lm_head.weight.detach(), mllm_state["lm_head.weight"].float(), rtol=0, atol=0
    )
    for key, value in head.state_dict().items():
        torch.testing.assert_close(value, mllm_state["edit_head." + key].float(), rtol=0, atol=0)
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, unet_state[key].float(), rtol=0, atol=0)
    # the [IMG] rows the MLLM hands to the edit head are the released ones
    torch.testing.assert_close(mllm.img_embeds(1)[0].detach(), expected_embed[-N:])

    # the loaded head computes what the released EditMapper computes with the same weights
    released.load_state_dict({k: v.float() for k, v in mllm_state.items() if k != "emb"})
    hidden = torch.randn(2, N, mllm.hidden_size)
    emb = expected_embed[-N:].unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, emb), released.edit_head(hidden, emb))


def test_without_unet_and_without_emb(parts, tmp_path):
    mllm, head, _ = parts
    _, mllm_state, _ = _fabricate(parts, tmp_path, emb=False)
    weights = load_release(str(tmp_path / "mllm.pt"), None)
    assert weights.unet is None and weights.img_embeds is None
    apply_release(mllm, head, None, weights)
    torch.testing.assert_close(
        head.query.detach(), mllm_state["edit_head.query"].float(), rtol=0, atol=0
    )


def test_vocab_mismatch_names_key_and_shapes(parts, tmp_path):
    mllm, head, unet = parts
    _fabricate(parts, tmp_path)
    weights = load_release(str(tmp_path / "mllm.pt"), str(tmp_path / "unet.pt"))
    weights.embed_tokens = weights.embed_tokens[:-1]
    before = mllm.embed_tokens.weight.detach().clone()
    vocab, hidden = before.shape
    with pytest.raises(ValueError) as err:
        apply_release(mllm, head, unet, weights)
    message = str(err.value)
    assert "model.embed_tokens.weight" in message
    assert f"({vocab}, {hidden})" in message and f"({vocab - 1}, {hidden})" in message
    assert torch.equal(mllm.embed_tokens.weight, before)  # nothing copied


def test_edit_head_and_unet_mismatches(parts, tmp_path):
    mllm, head, unet = parts
    _fabricate(parts, tmp_path)
    path = str(tmp_path / "mllm.pt"), str(tmp_path / "unet.pt")

    weights = load_release(*path)
    del weights.edit_head["hid2feat.bias"]
    with pytest.raises(KeyError, match=r"edit_head\.hid2feat\.bias"):
        apply_release(mllm, head, unet, weights)

    weights = load_release(*path)
    weights.edit_head["query"] = torch.zeros(1, 76, HEAD["d_model"])
    with pytest.raises(ValueError, match=r"edit_head\.query.*\(1, 77, 16\).*\(1, 76, 16\)"):
        apply_release(mllm, head, unet, weights)

    weights = load_release(*path)
    weights.unet["conv_in.weight"] = weights.unet["conv_in.weight"][:, :4]  # a 4-channel SD UNet
    with pytest.raises(ValueError, match=r"unet\.conv_in\.weight"):
        apply_release(mllm, head, unet, weights)

    weights = load_release(str(tmp_path / "mllm.pt"), None)
    with pytest.raises(ValueError, match="no unet.pt"):
        apply_release(mllm, head, unet, weights)


def test_emb_that_disagrees_with_embed_rows_warns(parts, tmp_path):
    mllm, head, _ = parts
    _fabricate(parts, tmp_path)
    weights = load_release(str(tmp_path / "mllm.pt"), None)
    weights.img_embeds = weights.img_embeds + 1
    with pytest.warns(UserWarning, match="differs from the \\[IMG\\] rows"):
        apply_release(mllm, head, None, weights)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_release(str(tmp_path / "absent.pt"), None)

    no_embed = {"lm_head.weight": torch.zeros(2, 2), "edit_head.query": torch.zeros(1)}
    torch.save(no_embed, tmp_path / "a.pt")
    with pytest.raises(KeyError, match="model.embed_tokens.weight"):
        load_release(str(tmp_path / "a.pt"), None)

    no_head = {"model.embed_tokens.weight": torch.zeros(2, 2), "lm_head.weight": torch.zeros(2, 2)}
    torch.save(no_head, tmp_path / "b.pt")
    with pytest.raises(KeyError, match="edit_head"):
        load_release(str(tmp_path / "b.pt"), None)

    torch.save({"model.embed_tokens.weight": _Opaque()}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt.*weights_only"):
        load_release(str(tmp_path / "c.pt"), None)


class _Opaque:
    """A pickled object that weights_only loading must refuse."""
