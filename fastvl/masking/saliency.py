"""EPIC's saliency-based masking (papers/004_4782e0e015295f89.txt, sec. 4.4, eq. 8, appendix B-C).

**Saliency (eq. 8).** A frozen teacher VLM reads the pair (w, v). At its penultimate fusion layer, per
head k, the image [CLS] gives a query q_k^V [d_h] and every text token a key K_k^W [n, d_h]; then

    α = softmax_over_text( (1/h) Σ_k q_k^V (K_k^W)^T )          α ∈ R^n, Σ_i α_i = 1

Here the softmax runs over the *maskable* tokens only (real tokens that are not [CLS]/[SEP]/[PAD]):
special tokens and padding get α = 0 and the rest sums to 1 (a caption with no maskable token gets all
zeros). Scores are computed in fp32; ``scale`` multiplies them before the softmax (eq. 8 has none: 1.0).

**How "image [CLS] as the query over text keys" maps onto fastvl's fusion encoders** (the teacher's
layout decides; the observer hook of ``ObservedAttention`` hands us that layer's q and k, already
projected and split into heads):

- *ALBEF layout* (``FusionEncoder``: text self-attention, then cross-attention text -> image; also
  MaskVLM's text cross-modality encoder). The image is never a query in these layers and the image
  states are not updated by fusion, so there is no "cross-modal image [CLS] query". What the layer
  *does* compute between the image [CLS] and each text token is the cross-attention logit
  ``s_k[t] = q_k(h_t) · k_k(v_cls)``: the text token's cross-modal query (its state after the layer's
  self-attention over the fused text) against the image [CLS] key of that layer. It is the same
  bilinear image-[CLS]-to-token score as eq. 8, read column-wise: we take, for the image [CLS]
  column, all text rows, average over heads and softmax *over the text tokens* (not over image keys,
  as the attention itself does). This uses only learned projections of the named layer, no new
  parameters.
- *Single-stream layout* (MAMO's ``ConcatFusionEncoder``: self-attention over [image; text]). The
  image [CLS] is row 0 of the fused sequence, so eq. 8 applies literally: q_k = query of row 0, K_k =
  keys of the text rows ``text_offset:`` of the penultimate layer's self-attention.

"Penultimate" = fusion layer ``layer`` (default -2, i.e. ``fusion_layers - 2``; with a single fusion
layer, that layer). The teacher's forward stops as soon as that layer's attention has been observed
(the observer raises a private exception), and fusion layers after it are dropped at load time.

**Teacher.** ``load_teacher(path, cfg)`` rebuilds a fastvl checkpoint (run dir, step_<N> folder,
model.safetensors or an exported folder) with ``fastvl.train.checkpoint.load_recipe`` and keeps its backbone. The teacher is
frozen for good: its parameters become *non-persistent buffers* (``freeze_as_buffers``), so no
optimizer, gradient or ZeRO partition ever sees them and the run's checkpoints do not store them (the
path in the config is the source); ``train()`` keeps it in eval mode. The checkpoints store only the
teacher's ``fingerprint`` (a SHA-256 prefix of its weights): loading one next to a teacher whose weights
changed since warns that the masking will differ. It runs in the dtype of the
images it is given (cast once, lazily: bf16/fp16 under DeepSpeed).

**Positions.** ``m = ceil(ratio · n)`` per caption (n = maskable tokens; ratio 0.35 in the paper),
drawn without replacement with probability proportional to the weights (α, or uniform over the
maskable tokens for the "random positions" ablation) by Gumbel-top-k:
``keys_i = log w_i - log(-log u_i)``, take the m largest. With uniforms from ``dist.global_uniform``
the draw for a sample does not depend on how the batch is split over ranks.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..models.albef import AlbefModel

COUNT_EPS = 1e-6
"""``ceil(0.35 * 20)`` must be 7, not 8 (0.35 * 20 = 7.000000000000001 in floating point)."""


# ---------------------------------------------------------------------------------------------
# positions


def masked_count(maskable: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B] long: ``ceil(ratio * n_b)`` with n_b the number of maskable tokens of caption b (never more
    than n_b; 0 for an empty caption)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    n = maskable.bool().sum(dim=1)
    count = torch.ceil(n.double() * ratio - COUNT_EPS).long()
    return torch.minimum(count.clamp_min(0), n)


def sample_positions(weights: torch.Tensor, allowed: torch.Tensor, counts: torch.Tensor,
                     u: torch.Tensor) -> torch.Tensor:
    """Draw ``counts[b]`` distinct positions of row b among ``allowed`` [B, L], without replacement, with
    probability proportional to ``weights`` [B, L] (successive draws renormalised: the Plackett-Luce /
    Gumbel-top-k scheme). ``u`` [B, L] are uniforms in [0, 1). Returns a [B, L] bool mask.

    fp32 with guards: non-finite or negative weights count as 0; allowed positions whose weight is 0
    (e.g. a softmax underflow) keep a tiny weight so that ``counts`` can always be met; a row whose
    allowed weights sum to 0 or are not finite is drawn uniformly. Requires counts[b] <= allowed[b].sum().
    """
    if weights.shape != allowed.shape or weights.shape != u.shape or counts.shape != weights.shape[:1]:
        raise ValueError(f"sample_positions: weights {tuple(weights.shape)}, allowed {tuple(allowed.shape)}, "
                         f"u {tuple(u.shape)} must be [B, L] and counts [B], got {tuple(counts.shape)}")
    allowed = allowed.bool()
    if (counts > allowed.sum(dim=1)).any():
        raise ValueError("sample_positions: a row asks for more positions than it allows")
    with torch.no_grad():
        w = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
        w = torch.where(allowed, w, torch.zeros_like(w))
        total = w.sum(dim=1, keepdim=True)
        degenerate = ~(total > 0) | ~torch.isfinite(total)
        w = torch.where(degenerate, allowed.float(), w)
        tiny = torch.finfo(torch.float32).tiny
        gumbel = -torch.log(-torch.log(u.float().clamp(1e-12, 1.0 - 1e-7)))
        keys = torch.where(allowed, torch.log(w.clamp_min(tiny)) + gumbel, torch.full_like(w, float("-inf")))
        order = torch.argsort(keys, dim=1, descending=True)
        rank_taken = torch.arange(keys.shape[1], device=keys.device).unsqueeze(0) < counts.unsqueeze(1)
        return torch.zeros_like(allowed).scatter(1, order, rank_taken)


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax of ``scores`` [B, L] over the ``allowed`` positions of each row, in fp32; 0 elsewhere and
    on rows with no allowed position. Non-finite scores count as -inf; a row whose allowed scores are all
    non-finite gets the uniform distribution over its allowed positions."""
    allowed = allowed.bool()
    s = scores.float()
    s = torch.where(allowed & torch.isfinite(s), s, torch.full_like(s, float("-inf")))
    broken = allowed.any(dim=1, keepdim=True) & ~torch.isfinite(s).any(dim=1, keepdim=True)
    s = torch.where(broken & allowed, torch.zeros_like(s), s)
    empty = ~allowed.any(dim=1, keepdim=True)
    probs = torch.softmax(torch.where(empty, torch.zeros_like(s), s), dim=1)
    return torch.where(allowed, probs, torch.zeros_like(probs))


# ---------------------------------------------------------------------------------------------
# the teacher


def weights_fingerprint(module: nn.Module) -> torch.Tensor:
    """int64 scalar: the first 8 bytes of a SHA-256 over every buffer of ``module`` (name, dtype, shape
    and bytes, in name order; after ``freeze_as_buffers`` its weights are buffers). Equal for the same
    weights, different for any change."""
    digest = hashlib.sha256()
    tensors = dict(module.named_buffers())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.tensor(int.from_bytes(digest.digest()[:8], "little", signed=True))


def freeze_as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a non-persistent buffer of the same name (in place) and
    put it in eval mode. Tied parameters stay tied (one tensor)."""
    replaced: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            if param is not None:
                tensor = replaced.setdefault(id(param), param.detach())
                sub.register_buffer(name, tensor, persistent=False)
    return module.eval()


def load_teacher(path: Optional[str], cfg: RunConfig) -> AlbefModel:
    """The backbone of the fastvl checkpoint at ``path`` (run dir, step_<N> folder, model.safetensors
    or an exported folder), loaded on CPU with ``fastvl.train.checkpoint.load_recipe``, checked against
    the run (``ConfigError`` naming the mismatch), not yet frozen."""
    from ..train.checkpoint import load_recipe

    if not path:
        raise ConfigError("method.options.teacher: EPIC's saliency masking needs a teacher VLM — name a fastvl "
                          "checkpoint (a run directory, a step_<N> folder, a model.safetensors file or an exported "
                          "folder), e.g. a run "
                          "of the base method; or set method.options.masking=\"random\" (no teacher)")
    try:
        recipe, teacher_cfg, _ = load_recipe(path)
    except ConfigError as error:
        raise ConfigError(f"method.options.teacher: {error}") from None
    backbone = getattr(recipe, "backbone", None)
    if not isinstance(backbone, AlbefModel):
        raise ConfigError(f"method.options.teacher: the recipe in {path} ('{teacher_cfg.method.name}') has no "
                          f"ALBEF-layout backbone to read saliency from")
    mismatched = []
    if teacher_cfg.data.tokenizer != cfg.data.tokenizer:
        mismatched.append(f"data.tokenizer {teacher_cfg.data.tokenizer!r} vs {cfg.data.tokenizer!r}")
    if teacher_cfg.model.vocab_size != cfg.model.vocab_size:
        mismatched.append(f"model.vocab_size {teacher_cfg.model.vocab_size} vs {cfg.model.vocab_size}")
    if teacher_cfg.model.image_size != cfg.model.image_size:
        mismatched.append(f"model.image_size {teacher_cfg.model.image_size} vs {cfg.model.image_size}")
    if teacher_cfg.model.max_positions < cfg.data.max_text_len:
        mismatched.append(f"model.max_positions {teacher_cfg.model.max_positions} < data.max_text_len "
                          f"{cfg.data.max_text_len}")
    if mismatched:
        raise ConfigError(f"method.options.teacher: the checkpoint in {path} does not fit this run "
                          f"({'; '.join(mismatched)})")
    return backbone


class _Observed(Exception):
    """Raised by the observer once the saliency layer has been seen: the rest of the teacher is skipped."""


class SaliencyTeacher(nn.Module):
    """Eq. 8 from a frozen teacher backbone (see the module docstring for the layouts).

    ``forward(images [B,3,S,S], input_ids [B,L], attention_mask [B,L], maskable [B,L]) -> α [B, L]`` fp32,
    rows summing to 1 over ``maskable`` and 0 elsewhere. ``scores(...)`` gives the head-averaged scores
    before the softmax.

    Args:
        backbone: the teacher (an ``AlbefModel``; frozen here with ``freeze_as_buffers``).
        layer: fusion layer to read, Python-style index (default -2: the penultimate).
        scale: multiplies the head-averaged scores before the softmax (eq. 8: 1).
    """

    def __init__(self, backbone: AlbefModel, layer: int = -2, scale: float = 1.0):
        super().__init__()
        layers = backbone.fusion_encoder.encoder.layer
        count = len(layers)
        if count == 0:
            raise ConfigError("method.options.teacher: the teacher has no fusion layers to read saliency from")
        index = layer if layer >= 0 else count + layer
        if count == 1 and layer == -2:
            index = 0  # one fusion layer: it is the only cross-modal one
        if not 0 <= index < count:
            raise ConfigError(f"method.options.saliency_layer={layer} is outside the teacher's {count} fusion layers")
        chosen = layers[index]
        if getattr(chosen, "crossattention", None) is not None:
            self.layout, attention = "cross", chosen.crossattention.self
            self.text_offset = 0
        elif hasattr(backbone.fusion_encoder, "text_offset"):
            self.layout, attention = "concat", chosen.attention.self
            self.text_offset = int(backbone.fusion_encoder.text_offset)
        else:
            raise ConfigError(f"method.options.teacher: fusion encoder {type(backbone.fusion_encoder).__name__} "
                              f"has neither cross-attention nor a single-stream [image; text] layout")
        # later fusion layers never run (the forward stops at the observed layer): drop them
        backbone.fusion_encoder.encoder.layer = nn.ModuleList(list(layers)[:index + 1])
        self.layer_index, self.scale = index, float(scale)
        self.backbone = freeze_as_buffers(backbone)
        # the one persistent entry: which teacher a checkpoint was trained with (compared on load)
        self.register_buffer("fingerprint", weights_fingerprint(self.backbone))
        object.__setattr__(self, "_attention", attention)  # a view into backbone, not a second submodule

    def train(self, mode: bool = True):
        return super().train(False)  # a frozen teacher: always eval mode (no dropout)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        saved = state_dict.get(prefix + "fingerprint")
        if saved is not None and int(saved) != int(self.fingerprint):
            warnings.warn("EPIC: the checkpoint being loaded was trained with a different saliency teacher than "
                          "the one method.options.teacher points to now (its weights changed since): the masking "
                          "changes from here on. Restore that teacher to resume the same run.", RuntimeWarning)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def scores(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(1/h) Σ_k q_k^V · K_k^W for every text position, [B, L] fp32 (no scale, no mask)."""
        bb = self.backbone
        current = next((b.dtype for b in bb.buffers() if b.is_floating_point()), torch.float32)
        if images.is_floating_point() and images.dtype != current:
            bb.to(images.dtype)  # once: the teacher runs in the training compute dtype
        found: dict[str, torch.Tensor] = {}
        layout, offset, length = self.layout, self.text_offset, input_ids.shape[1]

        def observe(name, q, k, v, key_padding_mask):
            if layout == "cross":  # text queries x image [CLS] key
                found["scores"] = torch.einsum("bhld,bhd->bhl", q.float(), k[:, :, 0].float()).mean(dim=1)
            else:  # image [CLS] query x text keys
                keys = k[:, :, offset:offset + length].float()
                found["scores"] = torch.einsum("bhd,bhld->bhl", q[:, :, 0].float(), keys).mean(dim=1)
            raise _Observed

        previous = self._attention.observer
        self._attention.observer = observe
        try:
            image_states = bb.encode_image(images)
            text_states = bb.encode_text(input_ids, attention_mask)
            bb.fuse(text_states, attention_mask, image_states)
        except _Observed:
            pass
        finally:
            self._attention.observer = previous
        if "scores" not in found:
            raise RuntimeError(f"saliency: fusion layer {self.layer_index} of the teacher was never run")
        return found["scores"]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                maskable: torch.Tensor) -> torch.Tensor:
        return masked_softmax(self.scale * self.scores(images, input_ids, attention_mask), maskable)


def uniform_over(maskable: torch.Tensor) -> torch.Tensor:
    """The "random positions" ablation's weights: 1/n on each of the n maskable tokens of a row."""
    allowed = maskable.bool()
    return allowed.float() / allowed.sum(dim=1, keepdim=True).clamp_min(1).float()

