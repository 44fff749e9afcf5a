"""The ALBEF backbone: ViT image encoder, BERT text encoder, fusion encoder and the three heads.

Shapes (B batch, L text length, N patches, Dv/Dt vision/text width, E ITC width, V vocabulary):

=====================================================================  =====================================
``encode_image(images, replace_mask=None, keep_index=None)``           [B, 3, S, S] -> [B, 1+N', Dv]
``encode_text(input_ids, attention_mask, position_ids=None, *,         [B, L] -> [B, L, Dt]
token_type_ids=None, attn_mask=None, kind=None, step=None)``
``encode_captions(attention_mask, input_ids, masked_ids=None)``       -> ([B, L, Dt], [B, L, Dt] or None)
``fuse(text_states, attention_mask, image_states, image_mask=None, *,  -> [B, L, Dt] ([B, Dt] if cls_only)
image_index=None, cls_only=False, attn_mask=None, kind=None, step=None)``
``image_context(image_states, image_mask=None)``                       -> ``fusion.ImageContext``
``image_feat(image_states)`` / ``text_feat(text_states, mask)``        -> unit-norm [B, E] (projected [CLS];
                                                                       text: ``text_pooling``)
``mlm_logits(states)``                                                 [..., Dt] -> [..., V] (tied decoder)
``itm_logits(fused)``                                                  [B, L, Dt] or [B, Dt] -> [B, 2]
=====================================================================  =====================================

``kind``/``step`` [B, L] apply C-Mask's generalized-LM rule to the text self-attention of the text and
fusion encoders (see ``fastvl_kernels.perm_attention``); cross-attention to the image is unrestricted
apart from ``image_mask``. ``set_observer(fn)`` installs ``fn(name, q, k, v, key_padding_mask)`` on
every attention module; names are the modules' paths, e.g. ``text_encoder.encoder.layer.0.attention.self``,
``fusion_encoder.encoder.layer.1.crossattention.self``, ``vision_encoder.blocks.3.attn``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..config import ModelConfig
from .attention import ObservableModel, name_attention_modules
from .bert import TextEncoder
from .fusion import FusionEncoder, ImageContext
from .heads import MlmHead, unit_projection
from .hf_bert import BertLoadReport, load_hf_bert
from .init import init_weights
from .vision_init import VisionLoadReport, load_vision_checkpoint
from .vit import VisionTransformer


class AlbefModel(ObservableModel):
    """Backbone of every recipe. Submodules: ``vision_encoder``, ``text_encoder``, ``fusion_encoder``,
    ``vision_proj`` (Dv -> E), ``text_proj`` (Dt -> E), ``itm_head`` (Dt -> 2), ``mlm_head``.

    When ``cfg.text_init`` is set, the text and fusion encoders load it at construction
    (``hf_bert.load_hf_bert``; the report is kept in ``self.text_init_report``); likewise
    ``cfg.image_init`` for the ViT (``vision_init.load_vision_checkpoint``; ``self.image_init_report``).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_encoder = VisionTransformer(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion_encoder = FusionEncoder(cfg)
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.text_width, cfg.embed_dim)
        self.itm_head = nn.Linear(cfg.text_width, 2)
        self.mlm_head = MlmHead(cfg.text_width, cfg.vocab_size)
        for head in (self.vision_proj, self.text_proj, self.itm_head, self.mlm_head):
            head.apply(init_weights)
        self.text_init_report: Optional[BertLoadReport] = None
        if cfg.text_init:
            self.text_init_report = load_hf_bert(self.text_encoder, self.fusion_encoder, cfg.text_init,
                                                 mlm_head=self.mlm_head)
        self.image_init_report: Optional[VisionLoadReport] = None
        if cfg.image_init:
            self.image_init_report = load_vision_checkpoint(self.vision_encoder, cfg.image_init)
        name_attention_modules(self)

    # -- encoders -------------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, replace_mask: Optional[torch.Tensor] = None,
                     keep_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + N', Dv]; ``replace_mask`` [B, N] bool -> mask token, ``keep_index`` [B, K]."""
        return self.vision_encoder(images, replace_mask, keep_index)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: Optional[torch.Tensor] = None, *, token_type_ids: Optional[torch.Tensor] = None,
                    attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """[B, L] ids + [B, L] mask (1 = real token) -> [B, L, Dt]; position_ids default 0..L-1."""
        return self.text_encoder(input_ids, attention_mask, position_ids, token_type_ids,
                                 attn_mask=attn_mask, kind=kind, step=step)

    def encode_captions(self, attention_mask: torch.Tensor, input_ids: torch.Tensor,
                        masked_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(states of the caption, of its MLM-masked copy or None), both captions in one text-encoder pass
        when both are given: each product has twice the rows, which the CPU runs faster than two smaller
        ones (rows never mix; dropout draws one mask for the whole pass)."""
        if masked_ids is None:
            return self.encode_text(input_ids, attention_mask), None
        states = self.encode_text(torch.cat([input_ids, masked_ids]), attention_mask.repeat(2, 1))
        return states.chunk(2)

    def fuse(self, text_states: torch.Tensor, attention_mask: torch.Tensor,
             image_states: Union[torch.Tensor, ImageContext], image_mask: Optional[torch.Tensor] = None, *,
             image_index: Optional[torch.Tensor] = None, cls_only: bool = False,
             attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """Text states [B, L, Dt] cross-attending to image states [B, N, Dv] -> [B, L, Dt]; text row i reads
        image ``image_index[i]`` of [M, N, Dv] states or of an ``image_context`` when given; ``cls_only``
        -> the [CLS] rows [B, Dt] (see ``fusion.FusionEncoder``)."""
        return self.fusion_encoder(text_states, attention_mask, image_states, image_mask, image_index=image_index,
                                   cls_only=cls_only, attn_mask=attn_mask, kind=kind, step=step)

    def image_context(self, image_states: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> ImageContext:
        """The fusion encoder's cross-attention keys/values of these images, for several ``fuse`` passes."""
        return self.fusion_encoder.image_context(image_states, image_mask)

    # -- heads ----------------------------------------------------------------------------------

    def image_feat(self, image_states: torch.Tensor) -> torch.Tensor:
        """Unit-norm ITC embedding [B, E] of the image [CLS]."""
        return unit_projection(self.vision_proj, image_states[:, 0])

    def text_feat(self, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Unit-norm ITC embedding [B, E] of the text: its [CLS] row, or with ``model.text_pooling="mean"``
        the mean of the rows ``attention_mask`` [B, L] marks as real tokens."""
        if self.cfg.text_pooling == "cls":
            return unit_projection(self.text_proj, text_states[:, 0])
        if attention_mask is None:
            raise ValueError("model.text_pooling='mean' needs the attention mask of the text states")
        weights = attention_mask.to(text_states.dtype).unsqueeze(-1)
        return unit_projection(self.text_proj, (text_states * weights).sum(1) / weights.sum(1).clamp_min(1))

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """[..., Dt] -> [..., V], decoder tied to the word embeddings."""
        return self.mlm_head(states, self.text_encoder.embeddings.word_embeddings)

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """Match / no-match logits [B, 2] (index 1 = match) from the fused [CLS]; accepts the full fused
        states [B, L, Dt] or the [CLS] rows [B, Dt]."""
        return self.itm_head(fused[:, 0] if fused.dim() == 3 else fused)

    def zero3_external_parameters(self) -> list[tuple[Optional[nn.Module], nn.Parameter]]:
        """(reader, parameter) pairs of parameters read outside their own module's forward, for ZeRO-3
        (``train.engine.build_engine`` passes each to
        ``deepspeed.zero.register_external_parameter``, so it is gathered for the reader's forward and
        backward). Here the MLM head's forward reads the word-embedding matrix (the tied decoder). A
        reader of None means the recipe's own forward (a parameter read by a method, not a forward)."""
        return [(self.mlm_head, self.text_encoder.embeddings.word_embeddings.weight)]
