"""Vision Transformer image encoder (pre-norm, [CLS] + learned positions, patch convolution).

``VisionTransformer(cfg)`` maps images [B, 3, S, S] to states [B, 1 + N', Dv]: row 0 is [CLS], the rest
are patch tokens in row-major patch order (N = (S / p)^2 patches, N' = N or K when patches are dropped).

Two masking hooks used by the masked-image-modeling recipes:

- ``replace_mask`` [B, N] bool: those patch embeddings become a learned ``mask_token`` *before* the
  positions are added (SimMIM / MaskVLM: the encoder sees where a patch is missing);
- ``keep_index`` [B, K] long: only those patches (with their positions) enter the encoder (MAE-style
  dropping, MAMO); the output is [B, 1 + K, Dv] in ``keep_index`` order.

Both may be given (replace first, then keep).

``cfg.vision_layer_scale`` adds LayerScale (``ls1.gamma`` / ``ls2.gamma``, per-channel factors on each
residual branch, as in CaiT and DINOv2); ``cfg.vision_ln_eps`` sets the LayerNorm epsilon. Parameter names
follow timm's ``VisionTransformer`` (``patch_embed`` is the convolution itself); ``vision_init`` loads
pretrained timm / Hugging Face checkpoints into it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .attention import ObservedAttention, merge_heads, name_attention_modules, split_heads
from .checkpointing import run_layer
from .init import INIT_STD, init_weights

VIT_MLP_RATIO = 4
VIT_LAYER_SCALE_INIT = 1e-5
"""LayerScale's initial factor when training from scratch (DINOv2's ViT-S/B/L value)."""


class VisionAttention(ObservedAttention):
    """Multi-head self-attention over [CLS] + patches: fused qkv projection, output projection."""

    def __init__(self, width: int, heads: int, backend: str, dropout: float):
        super().__init__(backend, dropout, is_cross=False)
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = self.attend(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads))
        return self.proj(merge_heads(out))


class VisionMlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class LayerScale(nn.Module):
    """x * gamma, one learned factor per channel."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), VIT_LAYER_SCALE_INIT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class VisionBlock(nn.Module):
    """Pre-norm block: x + ls1(attn(LN(x))), then x + ls2(mlp(LN(x))); ls1/ls2 are identities unless
    ``layer_scale``."""

    def __init__(self, width: int, heads: int, backend: str, dropout: float, *, layer_scale: bool, ln_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = VisionAttention(width, heads, backend, dropout)
        self.ls1 = LayerScale(width) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = VisionMlp(width, VIT_MLP_RATIO * width, dropout)
        self.ls2 = LayerScale(width) if layer_scale else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.ls1(self.attn(self.norm1(x))))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT of ``cfg.image_size`` / ``cfg.patch_size`` / ``cfg.vision_{width,layers,heads,layer_scale,ln_eps}``.

    Attributes: ``num_patches`` (N), ``patch_size`` (p), ``width`` (Dv), ``image_size``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.patch_size = cfg.patch_size
        self.num_patches = cfg.num_patches
        self.width = cfg.vision_width
        self.checkpointed = cfg.grad_checkpointing
        self.patch_embed = nn.Conv2d(3, self.width, kernel_size=self.patch_size, stride=self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, self.width))
        self.blocks = nn.ModuleList(
            VisionBlock(self.width, cfg.vision_heads, cfg.attention, cfg.dropout,
                        layer_scale=cfg.vision_layer_scale, ln_eps=cfg.vision_ln_eps)
            for _ in range(cfg.vision_layers)
        )
        self.norm = nn.LayerNorm(self.width, eps=cfg.vision_ln_eps)
        self.apply(init_weights)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        name_attention_modules(self)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, p*p*3]: patch n = row-major (row, col) of the patch grid; within a
        patch the values are ordered (py, px, channel). MaskVLM's pixel-reconstruction target."""
        b, c, h, w = images.shape
        p = self.patch_size
        grid_h, grid_w = h // p, w // p
        x = images.reshape(b, c, grid_h, p, grid_w, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, grid_h * grid_w, p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Inverse of ``patchify``: [B, N, p*p*3] -> [B, 3, S, S]."""
        b, n, _ = patches.shape
        p = self.patch_size
        grid = int(round(n ** 0.5))
        x = patches.reshape(b, grid, grid, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, 3, grid * p, grid * p)

    def forward(self, images: torch.Tensor, replace_mask: Optional[torch.Tensor] = None,
                keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, 3, S, S] -> [B, 1 + N', Dv] (after the final LayerNorm).

        replace_mask [B, N] bool: True patches are replaced by the mask token (before positions).
        keep_index [B, K] long: only these patches are encoded, in this order.
        """
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer expects {self.image_size}x{self.image_size} images, "
                             f"got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, Dv]
        b = x.shape[0]
        if replace_mask is not None:
            if replace_mask.shape != (b, self.num_patches):
                raise ValueError(f"replace_mask must be [B, N] = [{b}, {self.num_patches}], got {tuple(replace_mask.shape)}")
            x = torch.where(replace_mask.bool().unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, 1:]
        if keep_index is not None:
            if keep_index.dim() != 2 or keep_index.shape[0] != b:
                raise ValueError(f"keep_index must be [B, K] with B={b}, got {tuple(keep_index.shape)}")
            x = torch.gather(x, 1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = run_layer(block, self.checkpointed, x)
        return self.norm(x)
