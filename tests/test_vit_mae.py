"""The shared ViT and the dual-modal MAE: names, shapes, token counts, table slices, the loss."""
import math

import numpy as np
import pytest
import torch

from s4d_dist.data.masking import random_masks
from s4d_dist.models.mae import PretrainMAE, mae_loss, mae_targets
from s4d_dist.models.vit import Attention, ViTEncoder, count_params, sinusoid_table
from s4d_dist.pixels import IMAGENET_MEAN, IMAGENET_STD

TINY = dict(img_size=32, patch=16, tubelet=2, num_frames=4, embed_dim=32, depth=2, num_heads=2,
            decoder_dim=16, decoder_depth=1, decoder_heads=2)


def test_sinusoid_table_matches_formula():
    table = sinusoid_table(800, 768)[0].double()
    for pos, j in [(0, 0), (1, 0), (1, 1), (123, 10), (799, 767), (400, 301)]:
        angle = pos / 10000 ** (2 * (j // 2) / 768)
        want = math.sin(angle) if j % 2 == 0 else math.cos(angle)
        assert table[pos, j].item() == pytest.approx(want, abs=1e-6)


def test_mae_vit_base_state_dict_matches_official():
    model = PretrainMAE()
    keys = list(model.state_dict())
    assert len(keys) == 218 and count_params(model) == 94_210_944
    assert keys[0] == "mask_token" and keys[-1] == "encoder_to_decoder.weight"
    assert not any("pos_embed" in k for k in keys)
    assert "encoder.blocks.0.attn.qkv.bias" not in keys
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.patch_embed.proj.weight"] == (768, 3, 2, 16, 16)
    assert shapes["decoder.blocks.3.attn.qkv.weight"] == (1152, 384)
    assert shapes["decoder.head.weight"] == (1536, 384)
    assert shapes["mask_token"] == (1, 1, 384)
    assert model.encoder_to_decoder.bias is None
    assert model.encoder.patch_embed.num_tokens == 800
    assert model.encoder.num_tokens("image") == 100


def test_position_table_follows_device_but_not_state_dict():
    enc = ViTEncoder(32, 16, 2, 4, 3, 32, 1, 2, 4.0, final_norm=True)
    assert "pos_embed" not in enc.state_dict()
    assert enc.to(torch.float64).pos_embed.dtype == torch.float64  # a buffer, unlike official


def test_image_is_two_repeated_frames_at_t0_slice():
    enc = ViTEncoder(32, 16, 2, 4, 3, 32, 1, 2, 4.0, final_norm=False)
    image = torch.randn(2, 3, 32, 32)
    tokens = enc.embed(image)
    assert tokens.shape == (2, 4, 32)  # (32/16)² tokens, one temporal slot
    clip = image.unsqueeze(2).repeat(1, 1, 4, 1, 1)  # 4 frames = 2 identical tubelets
    clip_tokens = enc.embed(clip)
    assert clip_tokens.shape == (2, 8, 32)
    torch.testing.assert_close(tokens, clip_tokens[:, :4])  # same content, table rows 0..3
    diff = clip_tokens[:, 4:] - clip_tokens[:, :4]  # second slot differs only by its positions
    torch.testing.assert_close(diff, (enc.pos_embed[:, 4:8] - enc.pos_embed[:, :4]).expand_as(diff))


def test_attention_has_q_and_v_bias_but_no_k_bias():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    torch.nn.init.normal_(attn.q_bias)
    torch.nn.init.normal_(attn.v_bias)
    x = torch.randn(1, 5, 8)
    w = attn.qkv.weight
    q = x @ w[:8].T + attn.q_bias
    k = x @ w[8:16].T
    v = x @ w[16:].T + attn.v_bias

    def heads(t):
        return t.view(1, 5, 2, 4).transpose(1, 2)

    scores = heads(q) @ heads(k).transpose(-1, -2) / 2.0
    out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(1, 5, 8)
    torch.testing.assert_close(attn(x), attn.proj(out))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_mae_predicts_every_token_from_visible_ones_only(modality):
    torch.manual_seed(0)
    model = PretrainMAE(**TINY).eval()
    pixels = torch.randn(2, 3, 32, 32) if modality == "image" else torch.randn(2, 3, 4, 32, 32)
    n = model.encoder.num_tokens(modality)
    mask = random_masks(2, n, 0.5)
    pred = model(pixels, mask)
    assert pred.shape == (2, n, 3 * 2 * 16 * 16)
    # Changing the pixels of a masked token must not change any prediction.
    token = int(mask[0].nonzero()[0])
    t, rest = divmod(token, 4)
    y, x = divmod(rest, 2)
    edited = pixels.clone()
    region = (slice(None), slice(y * 16, y * 16 + 16), slice(x * 16, x * 16 + 16))
    if modality == "image":
        edited[0][region] += 5.0
    else:
        edited[0][:, t * 2:t * 2 + 2, region[1], region[2]] += 5.0
    torch.testing.assert_close(model(edited, mask), pred)


def test_mae_rejects_ragged_masks():
    model = PretrainMAE(**TINY)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :4] = True
    mask[1, :3] = True
    with pytest.raises(ValueError, match="same number of visible"):
        model(torch.randn(2, 3, 4, 32, 32), mask)
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(2, 3, 4, 32, 32), mask[:, :4])
    # With the visible count given (no host read), the rows are checked by a device-side assert,
    # which on the CPU raises at once.
    with pytest.raises(RuntimeError, match="num_visible=4"):
        model(torch.randn(2, 3, 4, 32, 32), mask, num_visible=4)


def test_mae_given_visible_count_matches_the_one_read_from_the_mask():
    model = PretrainMAE(**TINY)
    pixels, mask = torch.randn(2, 3, 4, 32, 32), random_masks(2, 8, 0.75)
    torch.testing.assert_close(model(pixels, mask, num_visible=2), model(pixels, mask), rtol=0, atol=0)


def numpy_targets(pixels: np.ndarray, tubelet: int, patch: int) -> np.ndarray:
    """Independent per-token loop: un-normalise, cut, normalise per channel, channel fastest."""
    x = pixels * np.array(IMAGENET_STD)[:, None, None, None] + \
        np.array(IMAGENET_MEAN)[:, None, None, None]
    C, T, H, W = x.shape
    out = []
    for t in range(T // tubelet):
        for h in range(H // patch):
            for w in range(W // patch):
                block = x[:, t * tubelet:(t + 1) * tubelet, h * patch:(h + 1) * patch,
                          w * patch:(w + 1) * patch].reshape(C, -1)  # pixel order (t, y, x)
                mean = block.mean(1, keepdims=True)
                std = np.sqrt(block.var(1, ddof=1, keepdims=True) + 1e-6)
                out.append(((block - mean) / std).T.reshape(-1))  # channel fastest
    return np.stack(out)


def test_mae_loss_matches_numpy():
    torch.manual_seed(1)
    clip = torch.randn(2, 3, 4, 32, 32)
    image = torch.randn(2, 3, 32, 32)
    for pixels in (clip, image):
        target = mae_targets(pixels, tubelet=2, patch=16)
        padded = pixels if pixels.ndim == 5 else pixels.unsqueeze(2).repeat(1, 1, 2, 1, 1)
        want = np.stack([numpy_targets(p.double().numpy(), 2, 16) for p in padded])
        np.testing.assert_allclose(target.numpy(), want, rtol=1e-4, atol=1e-4)
        pred = torch.randn_like(target)
        mask = random_masks(2, target.shape[1], 0.5)
        m = mask.numpy()
        per_token = ((pred.double().numpy() - want) ** 2).mean(-1)
        assert mae_loss(pred, target, mask).item() == pytest.approx(
            per_token[m].sum() / m.sum(), rel=1e-5)


def test_mask_counts_exact_and_random():
    g = torch.Generator().manual_seed(0)
    image = random_masks(64, 100, 0.9, generator=g)
    video = random_masks(8, 800, 0.95, generator=g)
    assert (image.sum(1) == 90).all() and (video.sum(1) == 760).all()
    assert image.float().mean(0).min() > 0.6  # every position gets masked sometimes
    assert not torch.equal(video[0], video[1])


def test_normalisation_constants_made_once_serve_autograd():
    # The per-device constants are cached (a GPU copy each step would be a host sync); the first
    # caller may be in inference mode, later ones still need them saved for backward.
    from s4d_dist.pixels import _constant, unnormalize

    _constant.cache_clear()
    with torch.inference_mode():
        unnormalize(torch.zeros(1, 3, 2, 2))
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    unnormalize(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1).expand(1, 3, 2, 2))


def test_patch_embedding_is_the_official_conv3d_in_float64():
    """The Linear over flattened tubelets computes the official Conv3d (kernel = stride) with the
    same parameters: float64 outputs and weight gradients agree to rounding, images (repeated to
    a tubelet) and clips alike."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    enc = ViTEncoder(32, 16, 2, 4, 3, 24, 1, 2, 4.0, final_norm=False).double()
    proj = enc.patch_embed.proj
    for pixels in (torch.randn(2, 3, 4, 32, 32, dtype=torch.float64),
                   torch.randn(2, 3, 32, 32, dtype=torch.float64)):
        clip = pixels if pixels.ndim == 5 else pixels.unsqueeze(2).repeat(1, 1, 2, 1, 1)
        want = F.conv3d(clip, proj.weight, proj.bias, stride=(2, 16, 16)).flatten(2).transpose(1, 2)
        got = enc.patch_embed(pixels)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(want)
        (want_grad,) = torch.autograd.grad(want, proj.weight, grad)
        (got_grad,) = torch.autograd.grad(got, proj.weight, grad)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-12, atol=1e-12)


def test_mae_embeds_only_the_visible_tubelets():
    """The encoder's input is the full embedding's visible rows (positions included), computed
    from the visible tubelets alone."""
    torch.manual_seed(0)
    model = PretrainMAE(**TINY).double()
    pixels = torch.randn(3, 3, 4, 32, 32, dtype=torch.float64)
    mask = random_masks(3, 8, 0.75)
    keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :2]
    full = model.encoder.embed(pixels)
    want = torch.gather(full, 1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    torch.testing.assert_close(model.encoder.embed(pixels, keep), want, rtol=1e-12, atol=1e-12)
