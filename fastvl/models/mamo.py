"""MAMO's network (Zhao et al., 2023, section 3.1 and Fig. 2; papers/002_9cf33019e666e199.txt).

ALBEF's image encoder (ViT) and text encoder (the first BERT layers), but a *single-stream* fusion
encoder: BERT self-attention layers over the concatenation of the visual and the linguistic tokens
(``ConcatFusionEncoder``), instead of ALBEF's cross-attention layers. Plus the MAMO heads:

====================================  =============================================  =====================
paper                                 here                                           shape
====================================  =============================================  =====================
image encoder f^v                     ``vision_encoder`` (sees only visible patches   [B, 1+K, Dv]
                                      through ``keep_index``)
text encoder                          ``text_encoder``                                [B, L, Dt]
mask token, positions of "the full    ``fusion_encoder.mask_token`` [Dt],             [B, 1+N, Dt]
set" of image tokens                  ``fusion_encoder.image_positions`` [1+N, Dt]
multimodal fusion encoder             ``fusion_encoder`` over [image; text]           [B, 1+N+L, Dt]
projector g (MRM)                     ``mrm_projector``: MLP, one hidden layer        Dt -> P
predictor h_mrm (MRM)                 ``mrm_predictor``: MLP, one hidden layer        P -> P
predictor h_mim (MIM)                 ``mim_head``: MLP, one hidden layer             Dt -> Dv
h_mlm                                 ``mlm_head`` (BERT LM head, tied decoder)       Dt -> V
ITC projections g^v, g^t              ``vision_proj`` / ``text_proj`` (unit norm)     -> E
ITM head                              ``itm_head`` on the fused *text* [CLS]          Dt -> 2
====================================  =============================================  =====================

The fused sequence is ``[v_cls, v_1..v_N, w_cls, w_1..w_L]``: the image part always has all N patch
positions (visible patches from the image encoder, the shared mask token elsewhere), so row ``1 + n``
is patch ``n`` and the text starts at row ``text_offset = 1 + N``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from fastvl_kernels import CONTEXT

from ..config import ModelConfig
from .albef import AlbefModel
from .attention import name_attention_modules
from .bert import BertStack, text_layers
from .hf_bert import load_hf_bert
from .init import INIT_STD, init_weights


class Mlp(nn.Module):
    """``Linear(in, hidden) -> GELU -> Linear(hidden, out)``: the "MLP with one hidden layer" of MAMO's
    projector and predictors. Applied per token: [..., in] -> [..., out]."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.apply(init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConcatFusionEncoder(nn.Module):
    """Self-attention BERT layers over ``[image tokens; text tokens]`` (single-stream fusion).

    Image tokens are built by ``image_tokens``: the image-encoder states are mapped to the text width
    (``image_to_text``: identity at equal widths), the visible patches are scattered to their grid
    positions with the shared ``mask_token`` in every other position, and ``image_positions`` (learned,
    one per [CLS] + N patches) is added to the full set.

    ``forward(image_states, text_states, attention_mask, keep_index=None, image_mask=None, *, kind=None,
    step=None) -> [B, 1+N+L, Dt]``:

    - image_states [B, 1+K, Dv]: [CLS] then the K encoded patches, in ``keep_index`` order when given
      (K = N and grid order otherwise); keep_index [B, K] long: their patch numbers;
    - text_states [B, L, Dt]; attention_mask [B, L] (1 = real token; padding keys are hidden);
    - image_mask [B, 1+N] bool: False hides that image token as a key (default: all visible);
    - kind / step [B, L]: C-Mask's generalized-LM roles of the *text* tokens; image tokens are CONTEXT.
    """

    def __init__(self, cfg: ModelConfig, num_layers: Optional[int] = None):
        super().__init__()
        self.num_patches = cfg.num_patches
        self.width = cfg.text_width
        self.image_to_text = (nn.Identity() if cfg.vision_width == cfg.text_width
                              else nn.Linear(cfg.vision_width, cfg.text_width))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.text_width))
        self.image_positions = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.text_width))
        self.encoder = BertStack(text_layers(cfg, cfg.fusion_layers if num_layers is None else num_layers),
                                 cfg.grad_checkpointing)
        self.apply(init_weights)
        for p in (self.mask_token, self.image_positions):
            nn.init.trunc_normal_(p, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        name_attention_modules(self)

    @property
    def text_offset(self) -> int:
        """Row of the text [CLS] in the fused sequence (1 + N)."""
        return 1 + self.num_patches

    def no_weight_decay(self) -> list[str]:
        return ["mask_token", "image_positions"]

    def zero3_external_parameters(self) -> list[tuple[None, nn.Parameter]]:
        """``image_tokens`` is a method the recipe calls, not a forward: its two parameters are gathered
        for the recipe's forward under ZeRO-3 (see ``AlbefModel.zero3_external_parameters``)."""
        return [(None, self.mask_token), (None, self.image_positions)]

    def image_tokens(self, image_states: torch.Tensor, keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, 1+K, Dv] image-encoder states -> the full set [B, 1+N, Dt] (mask tokens + positions)."""
        x = self.image_to_text(image_states)
        b = x.shape[0]
        if keep_index is None:
            if x.shape[1] != 1 + self.num_patches:
                raise ValueError(f"image states have {x.shape[1] - 1} patches; pass keep_index for a subset of "
                                 f"the {self.num_patches}")
            full = x
        else:
            if keep_index.shape != (b, x.shape[1] - 1):
                raise ValueError(f"keep_index must be [B, K] = [{b}, {x.shape[1] - 1}], got {tuple(keep_index.shape)}")
            patches = self.mask_token.to(x.dtype).expand(b, self.num_patches, -1)
            patches = patches.scatter(1, keep_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
            full = torch.cat([x[:, :1], patches], dim=1)
        return full + self.image_positions.to(full.dtype)

    def encode_tokens(self, image_tokens: torch.Tensor, text_states: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], image_mask: Optional[torch.Tensor] = None, *,
                      kind: Optional[torch.Tensor] = None, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The fusion layers over ``cat([image_tokens [B, 1+N, Dt], text_states [B, L, Dt]])``."""
        b, n_image = image_tokens.shape[:2]
        length = text_states.shape[1]
        device = text_states.device
        image_keys = (torch.ones(b, n_image, dtype=torch.bool, device=device) if image_mask is None
                      else image_mask.bool())
        text_keys = (torch.ones(b, length, dtype=torch.bool, device=device) if attention_mask is None
                     else attention_mask.bool())
        key_padding_mask = torch.cat([image_keys, text_keys], dim=1)
        if kind is not None:
            kind = torch.cat([torch.full((b, n_image), CONTEXT, dtype=kind.dtype, device=device), kind], dim=1)
            step = torch.cat([torch.zeros((b, n_image), dtype=step.dtype, device=device), step], dim=1)
        hidden = torch.cat([image_tokens, text_states.to(image_tokens.dtype)], dim=1)
        return self.encoder(hidden, key_padding_mask, kind=kind, step=step)

    def forward(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                keep_index: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None, *,
                kind: Optional[torch.Tensor] = None, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.encode_tokens(self.image_tokens(image_states, keep_index), text_states, attention_mask,
                                  image_mask, kind=kind, step=step)


class MamoModel(AlbefModel):
    """ALBEF's backbone with the concatenation fusion encoder and MAMO's heads (table above).

    Everything ``AlbefModel`` offers works: ``encode_image`` (with ``keep_index``), ``encode_text``,
    ``image_feat``/``text_feat``, ``mlm_logits``, ``itm_logits``, the observer. ``fuse`` keeps ALBEF's
    contract (fused *text* states [B, L, Dt]); ``fuse_all`` returns the whole fused sequence.

    ``cfg.text_init`` loads a BertModel into the text encoder (first ``text_layers`` layers) and the
    fusion encoder (the next ``fusion_layers``), as the paper initialises from BERT-base's first and
    last 6 layers; the fusion layers have no new cross-attention, so only ``image_to_text``,
    ``mask_token`` and ``image_positions`` start fresh there.

    Args:
        mrm_dim / mrm_hidden: output and hidden width of the MRM projector and predictor.
        mim_hidden: hidden width of the MIM predictor (its output is the vision width Dv).
    """

    def __init__(self, cfg: ModelConfig, *, mrm_dim: int, mrm_hidden: int, mim_hidden: int):
        # ALBEF's cross-attention fusion encoder is replaced: build the rest without it
        super().__init__(dataclasses.replace(cfg, fusion_layers=0, text_init=None))
        self.cfg = cfg
        self.fusion_encoder = ConcatFusionEncoder(cfg)
        self.mrm_projector = Mlp(cfg.text_width, mrm_hidden, mrm_dim)
        self.mrm_predictor = Mlp(mrm_dim, mrm_hidden, mrm_dim)
        self.mim_head = Mlp(cfg.text_width, mim_hidden, cfg.vision_width)
        if cfg.text_init:
            self.text_init_report = load_hf_bert(self.text_encoder, self.fusion_encoder, cfg.text_init,
                                                 mlm_head=self.mlm_head)
        name_attention_modules(self)

    @property
    def text_offset(self) -> int:
        """Row of the text [CLS] in ``fuse_all``'s output (1 + N)."""
        return self.fusion_encoder.text_offset

    def fuse_all(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor,
                 keep_index: Optional[torch.Tensor] = None, image_mask: Optional[torch.Tensor] = None, *,
                 kind=None, step=None) -> torch.Tensor:
        """The fused sequence [B, 1+N+L, Dt] (see ``ConcatFusionEncoder``)."""
        return self.fusion_encoder(image_states, text_states, attention_mask, keep_index, image_mask,
                                   kind=kind, step=step)

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_states: torch.Tensor,
             image_mask: Optional[torch.Tensor] = None, *, attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """ALBEF's contract: the fused text states [B, L, Dt] of (image, text). ``image_mask`` [B, 1+N]
        hides image tokens as keys. A general ``attn_mask`` is not supported here: over the
        concatenation it would also have to say what the image rows may see."""
        if attn_mask is not None:
            raise NotImplementedError("MamoModel.fuse: attn_mask is not supported by the concatenation fusion "
                                      "encoder; restrict the text with kind/step instead")
        fused = self.fuse_all(image_states, text_states, attention_mask, None, image_mask, kind=kind, step=step)
        return fused[:, self.text_offset:]
