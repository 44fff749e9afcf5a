"""VisionTransformer: shapes, patchify layout, replace_mask (SimMIM/MaskVLM) and keep_index (MAE/MAMO)."""
import pytest
import torch

from fastvl.config import ModelConfig
from fastvl.models import VisionTransformer


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(ModelConfig(preset="tiny", attention="eager")).eval()


def images(batch=2, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_shapes(vit):
    cfg = ModelConfig(preset="tiny")
    assert vit.num_patches == cfg.num_patches == 64 and vit.patch_size == 8
    out = vit(images())
    assert out.shape == (2, 1 + 64, cfg.vision_width)
    with pytest.raises(ValueError, match="64x64"):
        vit(torch.randn(1, 3, 32, 32))


def test_patchify_layout_and_inverse(vit):
    x = images(batch=2)
    patches = vit.patchify(x)
    p, grid = vit.patch_size, 64 // vit.patch_size
    assert patches.shape == (2, grid * grid, p * p * 3)
    b, row, col, py, px, ch = 1, 3, 5, 2, 6, 1
    n = row * grid + col
    assert patches[b, n, (py * p + px) * 3 + ch] == x[b, ch, row * p + py, col * p + px]
    assert torch.equal(vit.unpatchify(patches), x)


def test_replace_mask_hides_the_replaced_patches(vit):
    x = images()
    replace = torch.zeros(2, vit.num_patches, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(vit(x, replace_mask=replace), vit(x))
        replace[:, [0, 9, 40]] = True
        masked = vit(x, replace_mask=replace)
        # scribbling over a replaced patch changes nothing: the encoder never saw its pixels
        scribbled = x.clone()
        scribbled[:, :, 8:16, 8:16] = 5.0  # patch (row 1, col 1) = index 9
        assert torch.equal(vit(scribbled, replace_mask=replace), masked)
        assert not torch.allclose(masked, vit(x))
        assert not torch.allclose(vit(scribbled), vit(x))


def test_keep_index_drops_and_keeps_positions(vit):
    x = images()
    n = vit.num_patches
    with torch.no_grad():
        everything = torch.arange(n).expand(2, n)
        torch.testing.assert_close(vit(x, keep_index=everything), vit(x))
        keep = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:16] for s in (1, 2)])
        kept = vit(x, keep_index=keep)
        assert kept.shape == (2, 1 + 16, vit.width)
        # positions are added before dropping, so the order of keep_index only permutes the rows
        reverse = keep.flip(1)
        torch.testing.assert_close(vit(x, keep_index=reverse)[:, 1:], kept[:, 1:].flip(1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vit(x, keep_index=reverse)[:, 0], kept[:, 0], atol=1e-5, rtol=1e-5)
        # a dropped patch does not influence the output
        dropped = sorted(set(range(n)) - set(keep[0].tolist()) - set(keep[1].tolist()))[0]
        row, col = divmod(dropped, 64 // vit.patch_size)
        scribbled = x.clone()
        scribbled[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = -7.0
        assert torch.equal(vit(scribbled, keep_index=keep), kept)


def test_replace_and_keep_together(vit):
    x = images()
    replace = torch.zeros(2, vit.num_patches, dtype=torch.bool)
    replace[:, 3] = True
    keep = torch.tensor([[3, 4, 5], [3, 10, 11]])
    with torch.no_grad():
        out = vit(x, replace_mask=replace, keep_index=keep)
    assert out.shape == (2, 4, vit.width)
