"""C-Mask's curriculum masking: a PPO agent that picks masked spans and their factorization order to
maximise the cross-modal flow the main model's attention shows (C-Mask sections 3.2-3.3, appendix E).

Pieces (each usable on its own, tested in tests/methods/test_cmask.py):

- ``CurriculumOptions``: every switch, with the paper's defaults (quota 50%, top-8, clip 0.2,
  entropy coefficient 0.1, agent LR 1e-4, whole-batch updates).
- ``MaskingAgent``: the *shared* backbone features (the main model's first half of layers; they arrive
  detached, so no gradient reaches the backbone from the agent), the image's through a LayerNorm
  (``agent_image_input``) and the caption's through a Linear, + its own
  ``agent_layers`` BERT layers, in which the caption attends over ``[image | caption]`` (the image rows
  fixed by default, ``agent_image_rows``) + heads: start logits (p = softmax over the
  valid word positions), span continuation (s = sigmoid), order scores (q, Plackett-Luce logits) and
  a value head: V(s) = m a(s) + b(s), with (a, b) from the mean-pooled caption state and m the tokens
  the quota masks. G sums the reward over the m predicted tokens, so it grows with the caption; a
  mean-pooled state alone hardly tells the caption's length, and V would leave that growth in the
  advantage as noise.
- ``RewardMeter``: an attention observer. For every observed layer it calls the fused
  ``value_weighted_topk_reward`` on (destination rows = text + pseudo-mask rows) x (source = image
  tokens) and keeps the head mean [B, T]. No gradient; it reads detached q/k/v, so the main model's
  autograd is untouched.
- ``episode_return``: layerwise normalisation + average over layers -> R [B, T];
  G = sum_{prediction rows} R + mean_{caption rows} R (eq. in section 3.3).
- ``CurriculumMasking``: the policy. A recipe that drives it (cmask) hands it each batch once:
  ``episode(features, attention_mask, play, ...)`` samples the mask, calls the recipe back to run its
  main model on it (``play`` -> ``Played``: the reward observer, the rows of G, the recipe's outputs),
  and answers with the choice, that pass and every metric (``Episode``). Underneath, ``select`` samples
  an action with ``fastvl_kernels.sample_spans`` (or one agent pass per span, ``agent_passes``),
  ``finish`` attaches the return, ``learn`` runs PPO. It is an ``nn.Module`` *without* registered
  parameters: the agent (fp32 weights, its own Adam; it computes under autocast in ``agent_precision``,
  half precision on CUDA by default) is held outside the module tree so that DeepSpeed neither
  optimises nor down-casts it; its parameters, optimizer state, running reward statistics and the
  pending rollout travel in the recipe's ``state_dict`` through ``get_extra_state`` (a uint8 tensor
  of the serialised state, which every checkpoint path handles as an ordinary tensor).

Layerwise normalisation (``reward_layer_norm``): eq. 4 already divides each row by its mean over the
image tokens; layers then differ in scale (deeper layers attend more sharply). "running" (default)
divides layer l's head-mean reward by a running mean (momentum ``reward_norm_momentum``, initialised
with the first batch) of that layer's mean reward over the real destination rows, updated from the
learned rollouts only, so learned and random masks of one batch are compared on the same scale;
"batch" divides by this batch's mean of that layer; "none" skips it. Layers are then averaged.

Hosted mode (``attach_host``, used when another recipe such as MAMO names ``text_masking="curriculum"``):
the policy drives itself from that recipe's masking call; see ``attach_host``.

Schedule (``update_delay``): masks for batch t are sampled at the start of forward(t) by the agent
with its parameters after all updates so far. With delay 1 (default, the paper's parallel agent, which
learns one batch behind) the PPO update on batch t-1's rollout starts right after that sampling, from
the same parameters, while the main model trains on batch t; batch t's rollout waits, checkpointed, for
the next selection. With delay 0 the agent learns from batch t's rollout as soon as its reward is in.
On CUDA the update runs on a side stream beside the main model until the agent is read again (the next
``select``, a checkpoint); on CPU everything runs in order. The streams only change when work runs,
never what it computes. The agent learns on steps that fp16 skipped too: its fp32 update does not
depend on the main gradients, and rows without a finite return are left out (``ppo_update``). With
gradient accumulation every micro-batch is a batch here.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastvl_kernels import SpanSample, sample_spans, span_action_log_prob, value_weighted_topk_reward
from fastvl_kernels.span_sampling import bernoulli_entropy, clean_start_weights, quota_counts, xlogx

from ..config import ConfigError, RunConfig
from ..dist import rank_and_world
from ..models.attention import merge_heads, split_heads
from ..models.bert import BertLayer
from ..models.init import INIT_STD, init_weights
from ..precision import auto_precision
from .text import IGNORE_INDEX, TextMask

MASK_SELECTIONS = ("learned", "random")
SPAN_MODES = ("learned", "random", "none")
ORDER_MODES = ("learned", "random", "left_to_right", "single")
LAYER_NORMS = ("running", "batch", "none")
AGENT_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AGENT_IMAGE_ROWS = ("fixed", "updated")
AGENT_IMAGE_INPUTS = ("norm", "linear")
AGENT_PASSES = ("once", "per_span")


@dataclass
class CurriculumOptions:
    quota: float = 0.5
    """Fraction of each caption's words masked (paper: 50%)."""
    mask_selection: str = "learned"
    """Start positions: "learned" (agent's p) or "random" (uniform)."""
    spans: str = "learned"
    """Span extension: "learned" (agent's s), "random" (constant ``random_span_prob``), "none" (single tokens)."""
    random_span_prob: float = 0.5
    """Continuation probability of ``spans="random"``."""
    order: str = "learned"
    """Factorization order: "learned" (Plackett-Luce over q), "random", "left_to_right", "single" (one step = MLM)."""
    agent_layers: int = 4
    """The agent's own transformer layers on top of the shared ones (paper: 4, algorithm 1: 3)."""
    agent_image_rows: str = "fixed"
    """What the agent's layers do with the image rows. "fixed": every layer reads the shared image
    features as keys and values and updates only the caption rows, the way the fusion encoder of the
    paper's Fig. 2 layout reads the image (every head reads only the caption); "updated": every layer is
    joint self-attention over ``[image | caption]`` that also updates the image rows, 2.7x the agent's
    FLOPs at base size (197 image rows per 40 caption rows). The same with one layer."""
    agent_image_input: str = "norm"
    """How the shared image features enter the agent. "norm": a LayerNorm, as a pre-norm multiway block
    of the main model reads its input, so each layer's own key/value projection reads the normalised
    features; with fixed image rows its scale and shift fold into those projections, so training it
    costs nothing per image row. "linear": a Linear, which costs its own product and the gradient back
    through every layer's projection of every image row (at base size 14% of the agent's FLOPs with
    40-token captions, 19% with the built-in ones). "norm" needs the features as wide as the agent
    (every shipped config); otherwise the input is a Linear. The caption always enters through a Linear:
    its rows are few."""
    agent_passes: str = "once"
    """"once": one agent pass per batch; ``sample_spans`` draws every span from its p and s, each draw
    excluding what is masked. "per_span" (the paper's sec. 3.2): after each span the caption rows of
    the masked positions are tagged (a learned vector added at the agent's input, standing for the
    paper's <m> </m> tags) and the agent runs again; the order comes from the pass after the last span.
    Costs one agent pass per span (and one more with learned order), at sampling and in PPO."""
    shared_layers: Optional[int] = None
    """Backbone layers shared with the agent; None = half of them (paper: 6 of 12)."""
    agent_lr: float = 1e-4
    ppo_clip: float = 0.2
    entropy_coef: float = 0.1
    value_coef: float = 0.5
    """Weight of the value MSE in the agent's loss (the paper trains V with its own step; one Adam
    over the sum is equivalent up to this scale)."""
    ppo_epochs: int = 1
    """PPO passes over each whole-batch rollout (paper: whole-batch updates, no minibatches)."""
    update_delay: int = 1
    """0: learn from batch t once its reward is in; 1: learn from batch t-1 while the main model
    trains on batch t (parallel-agent schedule)."""
    reward_topk: int = 8
    reward_layer_norm: str = "running"
    reward_norm_momentum: float = 0.99
    random_reward_every: int = 10
    """Every N steps also measure G for a random mask of the same quota on the same batch (0 = never)."""
    agent_precision: str = "auto"
    """The agent's compute dtype; its weights and Adam stay fp32. "auto": on CUDA bf16 where supported,
    else fp16; on CPU bf16 where it is native (AVX512-BF16 / AMX), else fp32. On CUDA the main model runs
    in half precision on tensor cores, and an fp32 agent (18% of the main model's FLOPs at base size)
    would take longer than the main step it runs beside. "fp16" scales the agent's loss with its own
    ``torch.amp.GradScaler``."""

    def __post_init__(self):
        def check(ok, message):
            if not ok:
                raise ConfigError(f"method.options.{message}")

        check(0.0 < self.quota <= 1.0, "quota must be in (0, 1]")
        check(self.mask_selection in MASK_SELECTIONS, f"mask_selection must be one of {MASK_SELECTIONS}")
        check(self.spans in SPAN_MODES, f"spans must be one of {SPAN_MODES}")
        check(0.0 <= self.random_span_prob < 1.0, "random_span_prob must be in [0, 1)")
        check(self.order in ORDER_MODES, f"order must be one of {ORDER_MODES}")
        check(self.agent_layers >= 0, "agent_layers must be >= 0")
        check(self.agent_image_rows in AGENT_IMAGE_ROWS, f"agent_image_rows must be one of {AGENT_IMAGE_ROWS}")
        check(self.agent_image_input in AGENT_IMAGE_INPUTS, f"agent_image_input must be one of {AGENT_IMAGE_INPUTS}")
        check(self.agent_passes in AGENT_PASSES, f"agent_passes must be one of {AGENT_PASSES}")
        check(self.shared_layers is None or self.shared_layers >= 0, "shared_layers must be >= 0")
        check(self.agent_lr > 0, "agent_lr must be positive")
        check(self.ppo_clip > 0, "ppo_clip must be positive")
        check(self.entropy_coef >= 0 and self.value_coef >= 0, "entropy_coef and value_coef must be >= 0")
        check(self.ppo_epochs >= 1, "ppo_epochs must be >= 1")
        check(self.update_delay in (0, 1), "update_delay must be 0 or 1")
        check(self.reward_topk >= 1, "reward_topk must be >= 1")
        check(self.reward_layer_norm in LAYER_NORMS, f"reward_layer_norm must be one of {LAYER_NORMS}")
        check(0.0 <= self.reward_norm_momentum < 1.0, "reward_norm_momentum must be in [0, 1)")
        check(self.random_reward_every >= 0, "random_reward_every must be >= 0")
        check(self.agent_precision in AGENT_PRECISIONS, f"agent_precision must be one of {AGENT_PRECISIONS}")

    @property
    def learns(self) -> bool:
        """Whether any part of the action comes from the agent (else there is nothing to train)."""
        return self.mask_selection == "learned" or self.spans == "learned" or self.order == "learned"


# ---------------------------------------------------------------------------------------------
# the agent network


@dataclass
class AgentOutput:
    start_logits: torch.Tensor  # [B, L] over the caption columns
    cont_logits: torch.Tensor  # [B, L]
    order_scores: torch.Tensor  # [B, L]
    value: torch.Tensor  # [B] V(s) = masked * a(s) + b(s)


#: the PPO statistics ``ppo_update`` reports (logged every step: zeros until the first update)
AGENT_METRICS = ("agent_value_loss", "agent_policy_loss", "agent_entropy", "agent_clip_fraction", "agent_advantage")


class MaskingAgent(nn.Module):
    """Own layers + heads over the shared features ``[image | text]`` (all fp32).

    Every head reads the caption: the action heads per word and the value head as the mean of the
    caption's real rows. So the image rows only give keys and values: with ``image_rows="fixed"`` in
    every layer (projected from the shared features, all layers' in one matrix product), with
    "updated" in the last one, after joint layers that update them too. The caption layers' row-wise
    work (output projection, FFN, heads) runs on the real caption rows only, packed, on CPU
    (``pack_rows``): padded rows are never read. ``image_in`` folds into the image rows' key/value
    projection: as a LayerNorm ("norm") its scale and shift, as a Linear with one layer the whole
    product. All of it is exact: the outputs at the real rows equal those of the plain
    layer stack (tested)."""

    def __init__(self, image_width: int, text_width: int, width: int, heads: int, intermediate: int, layers: int,
                 image_rows: str = "fixed", image_input: str = "norm", tags: bool = False):
        super().__init__()
        # "norm" needs equal widths (see ``CurriculumOptions.agent_image_input``)
        norm = image_input == "norm" and image_width == width
        self.image_in = nn.LayerNorm(width) if norm else nn.Linear(image_width, width)
        self.image_width = image_width
        self.text_in = nn.Linear(text_width, width)
        self.modality = nn.Parameter(torch.zeros(2, width))
        self.layers = nn.ModuleList(BertLayer(width, heads, intermediate, "sdpa", 0.0) for _ in range(layers))
        self.image_rows = image_rows
        self.action_heads = nn.Linear(width, 3)  # start logit, continuation logit, order score
        # (a, b) of V(s) = m a + b: a per-token return and an offset (see the module docstring)
        self.value_head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))
        # the caption layers' row-wise work on the real caption rows only; None = on CPU only (counting
        # the rows is a host sync on CUDA, where padded rows cost little beside the main model)
        self.pack_rows: Optional[bool] = None
        self.apply(init_weights)
        # per-span passes: added to the caption rows already masked (the paper's <m> </m> tags)
        self.tag = nn.Parameter(torch.randn(width) * INIT_STD) if tags else None

    def forward(self, image_feats: torch.Tensor, text_feats: torch.Tensor, text_padding: torch.Tensor,
                masked: torch.Tensor, tagged: Optional[torch.Tensor] = None) -> AgentOutput:
        """``masked`` [B]: the tokens the action will mask (the quota's count), V's multiplier;
        ``tagged`` [B, L] bool: caption positions already masked (per-span passes only)."""
        b, n_img, length = image_feats.shape[0], image_feats.shape[1], text_feats.shape[1]
        width = self.text_in.out_features
        real = text_padding.bool()
        text = self.text_in(text_feats.float()) + self.modality[1]
        if tagged is not None:
            text = text + tagged.unsqueeze(-1).to(text.dtype) * self.tag
        pack = self.pack_rows if self.pack_rows is not None else not text.is_cuda
        rows = real.flatten().nonzero().squeeze(1) if pack else torch.arange(real.numel(), device=real.device)
        if not len(self.layers):
            caption = text.flatten(0, 1).index_select(0, rows)
        else:
            if self.image_rows == "updated" and len(self.layers) > 1:
                x = torch.cat([self.image_in(image_feats.float()) + self.modality[0], text], dim=1)
                padding = torch.cat([real.new_ones(b, n_img), real], 1)
                for layer in self.layers[:-1]:
                    x = layer(x, padding)
                caption_layers, text = self.layers[-1:], x[:, n_img:]
                projections = [_query_key_value(self.layers[-1])]  # [3W, W], [3W] per caption layer
                (weight, bias), = projections
                image_kv = [F.linear(x[:, :n_img], weight[width:], bias[width:])]
            else:
                caption_layers = self.layers
                projections = [_query_key_value(layer) for layer in self.layers]
                image_kv = self._fixed_image_kv(image_feats.float(), projections)
            for i, (layer, projection, kv) in enumerate(zip(caption_layers, projections, image_kv)):
                if i:  # the previous layer's caption rows [rows, W] back in place, [B, L, W]
                    text = caption.new_zeros(b * length, caption.shape[1]).index_copy(0, rows, caption)
                    text = text.view(b, length, -1)
                caption = self._caption_rows(layer, projection, text, kv, real, rows)  # [rows, W]
        heads = self.action_heads(caption)  # under autocast the heads' dtype may differ from the caption's
        actions = heads.new_zeros(b * length, 3).index_copy(0, rows, heads)
        start, cont, order = actions.view(b, length, 3).unbind(-1)
        weights = real.flatten()[rows].float().unsqueeze(-1)  # 1 for every packed row; 0 at padding otherwise
        pooled = weights.new_zeros(b, caption.shape[1]).index_add(0, rows // length, caption.float() * weights)
        pooled = pooled / real.sum(1, keepdim=True).clamp(min=1)
        per_token, offset = self.value_head(pooled).float().unbind(-1)
        return AgentOutput(start, cont, order, masked.to(per_token.dtype) * per_token + offset)

    @property
    def image_input(self) -> str:
        """What ``image_in`` is: "norm" (a LayerNorm) or "linear"."""
        return "norm" if isinstance(self.image_in, nn.LayerNorm) else "linear"

    def _fixed_image_kv(self, image_feats: torch.Tensor, projections) -> list[torch.Tensor]:
        """Every layer's keys/values of the (not updated) image rows, [B, N, 2W] each, in one product
        (``projections``: each layer's ``_query_key_value``)."""
        width = self.text_in.out_features
        weight = torch.cat([w[width:] for w, _ in projections])
        bias = torch.cat([b[width:] for _, b in projections])
        image_bias = self.image_in.bias + self.modality[0]
        if self.image_input == "linear" and len(self.layers) > 1:
            kv = F.linear(F.linear(image_feats, self.image_in.weight, image_bias), weight, bias)
        else:  # image_in folded into the projections
            if self.image_input == "norm":  # its scale and shift
                image_feats = F.layer_norm(image_feats, (width,), eps=self.image_in.eps)
                folded = weight * self.image_in.weight
            else:  # one layer: the whole Linear (cheaper wherever the image rows outnumber the 2W outputs;
                # a rule of the shapes would make the rounding depend on the batch size)
                folded = weight @ self.image_in.weight
            kv = F.linear(image_feats, folded, weight @ image_bias + bias)
        return list(kv.split(2 * width, -1))

    def _caption_rows(self, layer: BertLayer, projection, text, image_kv, real, rows) -> torch.Tensor:
        """``layer`` at the caption ``rows`` (flat indices into [B, L]): queries from the caption ``text``
        [B, L, W], keys/values from ``[image | caption]`` (``image_kv`` = the image rows' keys and values;
        ``projection`` = the layer's ``_query_key_value``)."""
        attn, width = layer.attention.self, text.shape[-1]
        qkv = F.linear(text, *projection)
        query, text_kv = qkv.split([width, 2 * width], -1)
        key, value = torch.cat([image_kv, text_kv], 1).split(width, -1)
        padding = torch.cat([real.new_ones(real.shape[0], image_kv.shape[1]), real], 1)
        attended = attn.attend(*(split_heads(t, attn.heads) for t in (query, key, value)), padding)
        attended, residual = (t.flatten(0, 1).index_select(0, rows) for t in (merge_heads(attended), text))
        hidden = layer.attention.output(attended, residual)
        return layer.output(layer.intermediate(hidden), hidden)


def _query_key_value(layer: BertLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [3W, W], bias [3W]) of ``layer``'s query, key and value projections, stacked; rows W: are
    the keys and values."""
    attn = layer.attention.self
    return (torch.cat([attn.query.weight, attn.key.weight, attn.value.weight]),
            torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]))


def agent_compute_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``agent_precision`` on ``device``; None = plain fp32."""
    if precision == "auto":  # what train.precision=auto picks
        precision = auto_precision(device)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# ---------------------------------------------------------------------------------------------
# the reward


class RewardMeter:
    """Attention observer: per observed layer, the eq.-4 reward of every destination row, head mean.

    ``n_image``: for self-attention over ``[image | text ...]`` the first ``n_image`` keys are the
    sources and the remaining rows the destinations; for cross-attention (``accept`` names a
    cross-attention module, ALBEF) all keys are sources and all rows destinations.
    ``row_mask`` [B, T] marks real destination rows. ``layers`` collects [B, T] float32 per layer.
    """

    def __init__(self, n_image: int, row_mask: torch.Tensor, topk: int = 8,
                 accept: Optional[Callable[[str], bool]] = None, cross: bool = False):
        self.n_image, self.row_mask, self.topk = n_image, row_mask.bool(), topk
        self.accept, self.cross = accept, cross
        self.layers: list[torch.Tensor] = []

    def __call__(self, name, q, k, v, key_padding_mask):
        if self.accept is not None and not self.accept(name):
            return
        with torch.no_grad():
            if self.cross:
                rows, keys, values = q, k, v
                source_mask = key_padding_mask
            else:
                rows, keys, values = q[:, :, self.n_image:], k[:, :, :self.n_image], v[:, :, :self.n_image]
                source_mask = None if key_padding_mask is None else key_padding_mask[:, :self.n_image]
            reward = value_weighted_topk_reward(rows.detach().float(), keys.detach().float(), values.detach().float(),
                                                source_mask=source_mask, query_mask=self.row_mask, topk=self.topk)
            self.layers.append(reward.mean(1))

    def stacked(self) -> torch.Tensor:
        if not self.layers:
            raise RuntimeError("RewardMeter observed no attention layer")
        return torch.stack(self.layers)  # [layers, B, T]


def layer_means(layer_rewards: torch.Tensor, row_mask: torch.Tensor) -> torch.Tensor:
    """[layers] mean reward of each layer over the real destination rows."""
    w = row_mask.float()
    return (layer_rewards * w).sum((1, 2)) / w.sum().clamp(min=1)


def episode_return(layer_rewards: torch.Tensor, row_mask: torch.Tensor, predict_rows: torch.Tensor,
                   caption_rows: torch.Tensor, mode: str = "batch",
                   scale: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(R [B, T], G [B]) from per-layer rewards [layers, B, T].

    R = mean_l R_l / c_l with c_l = 1 ("none"), this batch's mean of layer l over real rows ("batch"),
    or the given running ``scale[l]`` ("running"). G = sum over ``predict_rows`` of R + mean over
    ``caption_rows`` of R."""
    if mode == "none":
        norm = torch.ones(layer_rewards.shape[0], device=layer_rewards.device)
    elif mode == "batch":
        norm = layer_means(layer_rewards, row_mask)
    else:
        norm = scale
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    reward = (layer_rewards / norm[:, None, None]).mean(0) * row_mask.float()
    caption = caption_rows.float()
    mean_caption = (reward * caption).sum(1) / caption.sum(1).clamp(min=1)
    return reward, (reward * predict_rows.float()).sum(1) + mean_caption


# ---------------------------------------------------------------------------------------------
# the policy


@dataclass
class Rollout:
    """One whole-batch episode: the agent's inputs (detached), the action, and (after ``finish``) G."""

    image_feats: torch.Tensor
    text_feats: torch.Tensor
    text_padding: torch.Tensor
    lengths: torch.Tensor  # [B] words per caption (the action space: caption columns 1..length)
    sample: SpanSample  # over the word columns [B, L-1]; its log_prob is the behaviour policy's (PPO's old)
    returns: Optional[torch.Tensor] = None
    step: int = 0

    def tensors(self) -> list[torch.Tensor]:
        fields = [self.image_feats, self.text_feats, self.text_padding, self.lengths, *self.sample, self.returns]
        return [t for t in fields if isinstance(t, torch.Tensor)]


@dataclass
class MaskChoice:
    """A sampled mask in caption coordinates."""

    mask: torch.Tensor  # [B, L] bool
    step: torch.Tensor  # [B, L] long, factorization step (>= 1 where masked)
    rollout: Optional[Rollout] = None  # None for the random baseline or when nothing is learned
    entropy: Optional[torch.Tensor] = None  # [B] the action's entropy estimate


@dataclass
class Played:
    """What a recipe's main model gives back for one mask (the ``play`` of ``CurriculumMasking.episode``)."""

    meter: Optional[RewardMeter]  # the reward observer of its pass; None when not asked to measure
    predict_rows: torch.Tensor  # [B, T] the rows that predict the masked tokens (G's sum)
    caption_rows: torch.Tensor  # [B, T] the caption's real rows (G's mean)
    output: object = None  # the recipe's own results of that pass (e.g. what its loss needs)


@dataclass
class Episode:
    """``CurriculumMasking.episode``'s one answer for a batch."""

    choice: MaskChoice
    played: Played  # of the policy's mask
    metrics: dict  # every per-step metric of the policy (see ``episode``)


class CurriculumMasking(nn.Module):
    """The curriculum policy (see the module docstring). ``width``/``heads``/``intermediate`` size the
    agent's own layers; ``image_width``/``text_width`` are the widths of the shared features."""

    def __init__(self, options: CurriculumOptions, *, image_width: int, text_width: int, width: int, heads: int,
                 intermediate: int, seed: int = 0):
        super().__init__()
        self.options = options
        self.seed = seed
        agent = MaskingAgent(image_width, text_width, width, heads, intermediate, options.agent_layers,
                             options.agent_image_rows, options.agent_image_input,
                             tags=options.agent_passes == "per_span")
        # held outside the module tree: fp32, own optimizer, invisible to DeepSpeed (see module docstring)
        object.__setattr__(self, "agent", agent)
        # fused: one kernel for all parameters, not one per tensor
        optimizer = torch.optim.Adam(agent.parameters(), lr=options.agent_lr, fused=True)
        object.__setattr__(self, "agent_optimizer", optimizer)
        self.loss_scaler: Optional[torch.amp.GradScaler] = None  # agent_precision fp16 only, on the agent's device
        self.reward_scale: Optional[torch.Tensor] = None  # running per-layer means ("running")
        self.pending: list[Rollout] = []  # rollouts with returns, waiting for ``learn``
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.unpublished_metrics: dict[str, torch.Tensor] = {}  # of a PPO update not yet joined
        self.last_random_return: Optional[torch.Tensor] = None
        self.side_stream = None  # CUDA only: where ``learn`` runs; see ``join``

    # -- device / dtype: the agent follows the device of the recipe, never its dtype -------------

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros(()))
        if probe.device != next(self.agent.parameters()).device:
            self.agent.to(probe.device)
            for s in self.agent_optimizer.state.values():  # fused Adam: every state tensor, step included,
                for key, value in s.items():                 # lives on the parameters' device
                    if isinstance(value, torch.Tensor):
                        s[key] = value.to(probe.device)
            if self.loss_scaler is not None:
                self.loss_scaler = _grad_scaler(probe.device, self.loss_scaler.state_dict())
        return super()._apply(fn, recurse)

    # -- acting ---------------------------------------------------------------------------------

    def run_agent(self, image_feats: torch.Tensor, text_feats: torch.Tensor, padding: torch.Tensor,
                  tagged: Optional[torch.Tensor] = None) -> AgentOutput:
        """The agent's forward in its compute dtype (``agent_precision``, autocast over fp32 weights);
        ``tagged`` [B, L]: the positions a per-span pass sees as masked."""
        device = next(self.agent.parameters()).device
        dtype = agent_compute_dtype(self.options.agent_precision, device)
        masked = quota_counts(self.action_space(padding), self.options.quota, padding.shape[1] - 1)
        with contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype):
            return self.agent(image_feats, text_feats, padding, masked, tagged)

    def action_space(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Words per caption: columns 1 .. n-2 of ``[CLS] words [SEP]`` (the agent never masks specials)."""
        return (attention_mask.long().sum(1) - 2).clamp(min=0)

    def distributions(self, out: AgentOutput, lengths: torch.Tensor):
        """(p, s, q) over the word columns [B, L-1] (fp32): p is a softmax over the valid positions
        (invalid -> 0) or uniform; s the sigmoid of the continuation logits, a constant, or 0."""
        o = self.options
        start = out.start_logits[:, 1:].float()
        valid = torch.arange(start.shape[1], device=start.device) < lengths[:, None]
        if o.mask_selection == "learned":
            p = start.masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)
        else:
            p = valid.float()
        if o.spans == "learned":
            s = torch.sigmoid(out.cont_logits[:, 1:].float())
        else:
            s = torch.full_like(start, o.random_span_prob if o.spans == "random" else 0.0)
        q = out.order_scores[:, 1:].float() if o.order == "learned" else None
        return p, s, q

    def sample_seed(self, step: int, stream: int = 0) -> int:
        rank, _ = rank_and_world()
        return ((self.seed * 1_000_003 + step) * 1_009 + stream) * 65_537 + rank

    def select(self, image_feats: torch.Tensor, text_feats: torch.Tensor, attention_mask: torch.Tensor,
               step: int, *, random: bool = False) -> MaskChoice:
        """Sample masks + order for a batch from the shared features (detached here). ``random=True``
        samples the same-quota random baseline (uniform starts, same span/order modes without learning)."""
        o = self.options
        random = random or not o.learns  # nothing comes from the agent: skip its forward
        padding = attention_mask.bool()
        lengths = self.action_space(attention_mask)
        order = o.order
        with torch.no_grad():
            if random:
                p = (torch.arange(attention_mask.shape[1] - 1, device=padding.device) < lengths[:, None]).float()
                s = torch.full_like(p, o.random_span_prob) if o.spans != "none" else torch.zeros_like(p)
                order, q = ("random" if o.order == "learned" else o.order), None
            else:
                self.join()
                image_feats, text_feats = image_feats.detach().float(), text_feats.detach().float()
            if not random and o.agent_passes == "per_span":
                sample = self.sample_per_span(image_feats, text_feats, padding, lengths, self.sample_seed(step))
            else:
                if not random:
                    p, s, q = self.distributions(self.run_agent(image_feats, text_feats, padding), lengths)
                sample = sample_spans(p, s, lengths, o.quota, self.sample_seed(step, 1 if random else 0),
                                      order_scores=q, order=order)
        b, length = attention_mask.shape
        mask = torch.zeros(b, length, dtype=torch.bool, device=attention_mask.device)
        steps = torch.zeros(b, length, dtype=torch.long, device=attention_mask.device)
        mask[:, 1:] = sample.mask
        steps[:, 1:] = sample.step
        rollout = None if random else Rollout(image_feats, text_feats, padding, lengths, sample, step=step)
        if not random and self.training:
            self.learn()  # with update_delay=1: batch t-1's rollout, with the parameters that just sampled batch t
        return MaskChoice(mask, steps, rollout, sample.entropy)

    # -- a batch in one call --------------------------------------------------------------------

    def episode(self, image_feats: torch.Tensor, text_feats: torch.Tensor, attention_mask: torch.Tensor,
                play: Callable[[MaskChoice, bool], Played], *, draw: int, log_step: int) -> Episode:
        """One batch of the curriculum, the recipe's single call: sample the mask (``select``, which
        then learns from the waiting rollout), have the recipe's main model ``play(choice, measure)`` it,
        attach its return to the rollout (training), every ``random_reward_every`` logged steps also
        play a random same-quota mask, and report ``reward``, ``reward_per_token``, ``reward_random``,
        ``policy_entropy``, ``masked_fraction`` and the PPO statistics. ``draw`` seeds the masks
        (``sample_seed``); ``log_step`` is the optimizer step the metrics are logged at."""
        o = self.options
        choice = self.select(image_feats, text_feats, attention_mask, draw)
        # the reward is needed to train the agent or to report it; random masking without either skips it
        measure = o.learns or o.random_reward_every > 0
        played = play(choice, measure)
        metrics = {}
        if measure:
            reward, returns = self.compute_return(played.meter, played.predict_rows, played.caption_rows,
                                                  update_scale=self.training)
            if self.training:
                self.finish(choice, returns)
            predict = played.predict_rows
            metrics["reward"] = returns.mean()
            metrics["reward_per_token"] = reward[predict].mean() if predict.any() else returns.new_zeros(())
        if o.random_reward_every and (self.last_random_return is None or log_step % o.random_reward_every == 0):
            self.last_random_return = self.measure_returns(image_feats, text_feats, attention_mask, play, draw).mean()
        if self.last_random_return is not None:
            metrics["reward_random"] = self.last_random_return
        metrics["policy_entropy"] = choice.entropy.float().mean()
        metrics["masked_fraction"] = choice.mask.sum() / self.action_space(attention_mask).sum().clamp(min=1)
        if o.learns:
            metrics.update(self.agent_metrics())
        return Episode(choice, played, metrics)

    @torch.no_grad()
    def measure_returns(self, image_feats, text_feats, attention_mask, play: Callable[[MaskChoice, bool], Played],
                        draw: int, random: bool = True) -> torch.Tensor:
        """G [B] of one mask per caption drawn with key ``draw``: a random same-quota mask, or the
        policy's (``random=False``); nothing is learned and the running reward scale is read, not updated."""
        choice = self.select(image_feats, text_feats, attention_mask, draw, random=random)
        played = play(choice, True)
        _, returns = self.compute_return(played.meter, played.predict_rows, played.caption_rows, False)
        return returns.float()

    # -- per-span passes (``agent_passes="per_span"``) -------------------------------------------

    def sample_per_span(self, image_feats, text_feats, padding, lengths, seed: int) -> SpanSample:
        """The paper's loop: pass k of the agent sees spans 1..k-1 tagged and draws span k (a start from
        p over the free positions, then extensions with s, the law of ``sample_spans``' steps 1-2) until
        the quota is met; a last pass with every span tagged gives the order scores. The log-prob and
        entropy are ``per_span_terms`` of these very passes, the ones PPO recomputes."""
        o = self.options
        b, n_cols = padding.shape[0], padding.shape[1] - 1
        counts = quota_counts(lengths, o.quota, n_cols)
        generator = torch.Generator(device=padding.device).manual_seed(seed % (2 ** 63))
        cols = torch.arange(n_cols, device=padding.device)
        valid = cols < lengths[:, None]
        span_id = torch.zeros(b, n_cols, dtype=torch.long, device=padding.device)
        rows = torch.arange(b, device=padding.device)
        starts, conts = [], []
        while bool(((span_id > 0).sum(1) < counts).any()):
            k = len(starts) + 1
            p, s, _ = self.distributions(self.run_agent(image_feats, text_feats, padding, _tags(span_id > 0)), lengths)
            starts.append(p)
            conts.append(s)
            active = (span_id > 0).sum(1) < counts
            free = valid & (span_id == 0)
            weights = clean_start_weights(p, free, p.dtype)
            weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, free.float())  # the kernel's guard
            weights[~active] = 1.0  # finished rows draw a dummy start, never written
            start = torch.multinomial(weights, 1, generator=generator).squeeze(1)
            span_id[rows[active], start[active]] = k
            cursor, extending = start + 1, active.clone()
            while bool(extending.any()):
                at = cursor.clamp(max=n_cols - 1)
                extending &= (cursor < lengths) & (span_id[rows, at] == 0) & ((span_id > 0).sum(1) < counts)
                draw = torch.rand(b, generator=generator, device=padding.device)
                extending &= draw < s[rows, at]
                span_id[rows[extending], at[extending]] = k
                cursor = cursor + 1
        mask = span_id > 0
        q = None
        if o.order == "learned":
            q = self.distributions(self.run_agent(image_feats, text_feats, padding, _tags(mask)), lengths)[2]
        step = _order_steps(span_id, q, o.order, generator)
        zero = torch.zeros(b, device=padding.device)
        sample = SpanSample(mask, span_id, step, zero, zero)
        log_prob, entropy = self.per_span_terms(starts, conts, q, lengths, sample)
        return sample._replace(log_prob=log_prob.float(), entropy=entropy.float())

    def per_span_passes(self, image_feats, text_feats, padding, lengths, sample: SpanSample):
        """(log-prob [B], entropy [B], V [B]) of ``sample`` with every per-span pass rerun, differentiably,
        in one batched agent call (pass k sees spans 1..k-1 tagged; V from the untagged first pass)."""
        span_id = sample.span_id
        passes = int(span_id.amax()) + (self.options.order == "learned")
        tags = torch.stack([_tags((span_id > 0) & (span_id <= k)) for k in range(max(passes, 1))])  # [K, B, L]
        k, b = tags.shape[:2]
        out = self.run_agent(image_feats.repeat(k, 1, 1), text_feats.repeat(k, 1, 1), padding.repeat(k, 1),
                             tags.flatten(0, 1))
        out = AgentOutput(*(t.unflatten(0, (k, b)) for t in (out.start_logits, out.cont_logits, out.order_scores,
                                                               out.value)))
        dists = [self.distributions(AgentOutput(out.start_logits[i], out.cont_logits[i], out.order_scores[i],
                                                out.value[i]), lengths) for i in range(k)]
        q = dists[-1][2] if self.options.order == "learned" else None
        spans = int(span_id.amax())
        log_prob, entropy = self.per_span_terms([d[0] for d in dists[:spans]], [d[1] for d in dists[:spans]], q,
                                                lengths, sample)
        return log_prob, entropy, out.value[0]

    def per_span_terms(self, starts: list, conts: list, order_scores, lengths, sample: SpanSample):
        """(log-prob [B], entropy [B]) of ``sample`` when span k was drawn from pass k's p (``starts[k-1]``)
        and s (``conts[k-1]``), the order from ``order_scores``: span k's start over the positions free
        before it, the extension decisions of span k with pass k's s (the terms of
        ``span_action_log_prob``, each from its own pass), plus the order's terms."""
        o = self.options
        sid, device = sample.span_id, sample.span_id.device
        n_cols = sid.shape[1]
        valid = torch.arange(n_cols, device=device) < lengths[:, None]
        if not starts:  # empty captions: nothing was drawn
            zero = torch.zeros(sid.shape[0], device=device)
            return zero, zero
        p, s = torch.stack(starts).float(), torch.stack(conts).float().nan_to_num(0.0).clamp(0.0, 1.0)  # [K, B, L]
        span = torch.arange(1, p.shape[0] + 1, device=device)[:, None, None]  # pass k draws span k
        free = valid & ((sid == 0) | (sid >= span))  # [K, B, L]
        weights = clean_start_weights(p, free, p.dtype)
        uniform = weights.sum(-1, keepdim=True) <= 0
        weights = torch.where(uniform, free.float(), weights)
        total = weights.sum(-1)
        drawn = sid.amax(1) >= span[:, :, 0]  # [K, B]
        is_start = (sid > 0) & (F.pad(sid, (1, 0))[:, :n_cols] != sid)
        start_weight = torch.where(is_start & (sid == span), weights, 0.0).sum(-1)
        safe_total = torch.where(drawn, total, 1.0)
        log_prob = torch.where(drawn, torch.log(start_weight.clamp_min(1e-38)) - torch.log(safe_total), 0.0).sum(0)
        entropy = torch.where(drawn, torch.log(safe_total) - xlogx(weights).sum(-1) / safe_total, 0.0).sum(0)
        # extension decisions, each with the s of the pass that drew its span
        prev = F.pad(sid, (1, 0))[:, :n_cols]
        taken = (sid > 0) & (prev == sid)
        refused = valid & (prev > 0) & (prev != sid) & (prev != sid.amax(1, keepdim=True)) & ((sid == 0) | (sid > prev))
        drawing = torch.where(taken, sid, prev).clamp(1, p.shape[0]) - 1
        s_used = s.gather(0, drawing.unsqueeze(0)).squeeze(0)
        log_prob = log_prob + torch.where(taken, torch.log(s_used.clamp_min(1e-38)), 0.0).sum(1) + \
            torch.where(refused, torch.log((1 - s_used).clamp_min(1e-38)), 0.0).sum(1)
        entropy = entropy + torch.where(taken | refused, bernoulli_entropy(s_used), 0.0).sum(1)
        if o.order in ("learned", "random"):  # the order's terms: the full log-prob less the spans' ones
            last_p, last_s = p[-1], s[-1]
            ordered = span_action_log_prob(last_p, last_s, lengths, o.quota, sample, order_scores=order_scores,
                                           order=o.order)
            spans_only = span_action_log_prob(last_p, last_s, lengths, o.quota, sample, order="single")
            log_prob = log_prob + ordered[0] - spans_only[0]
            entropy = entropy + ordered[1] - spans_only[1]
        return log_prob, entropy

    def forward(self, batch, step: int) -> TextMask:
        """The plain policy interface (``text_masking(batch, step) -> TextMask``), for recipes that do not
        drive the agent themselves (MAMO's text view). Needs a host set by ``attach_host``; see there."""
        if self.host is None:
            raise ConfigError("the curriculum policy needs the recipe's backbone: build it with "
                              "build_text_masking(cfg, recipe) from a recipe with an ALBEF-layout backbone, or use "
                              "method.name='cmask'")
        return self.host_step(batch, step)

    # -- hosted mode: the policy of another recipe's MLM (composition) --------------------------

    def attach_host(self, recipe, special, text_view_last: bool = True) -> None:
        """Drive the agent from inside ``recipe``'s text masking call (MAMO: ``method.text_masking=
        "curriculum"``). Per call t: (1) the episode of call t-1 is closed with the reward its fusion
        forward produced and queued (learned at once with ``update_delay=0``); (2) the shared features of
        batch t are computed under no_grad from ``recipe.backbone`` (ViT output + text encoder output,
        the ALBEF mount); (3) the agent samples the mask ([MASK] in place, one step), then learns from
        the queued episode (PPO, ``select``); (4) a one-shot observer is armed on the fusion encoder's
        self-attention: the next ``fusion layers`` calls give the reward, reading the last B rows of the
        fused batch (MAMO fuses its two views as ``cat([image view, text view])``) with the image tokens
        first and the caption last."""
        object.__setattr__(self, "host", recipe)
        self.special = special
        self.text_view_last = text_view_last
        self.armed: Optional[tuple] = None

    host = None

    def _fusion_attention(self):
        from ..models.attention import ObservedAttention

        fusion = self.host.backbone.fusion_encoder
        return [m for m in fusion.modules() if isinstance(m, ObservedAttention) and not m.is_cross]

    def host_step(self, batch, step: int) -> TextMask:
        self._close_episode()
        bb = self.host.backbone
        with torch.no_grad():
            image_feats = bb.encode_image(batch.images)
            text_feats = bb.encode_text(batch.input_ids, batch.attention_mask)
        choice = self.select(image_feats, text_feats, batch.attention_mask, step)
        ids = torch.where(choice.mask, torch.full_like(batch.input_ids, self.special.mask), batch.input_ids)
        labels = torch.where(choice.mask, batch.input_ids, torch.full_like(batch.input_ids, IGNORE_INDEX))
        if self.host.training:
            self._arm(choice, batch.attention_mask)
        return TextMask(ids, labels)

    def _arm(self, choice: MaskChoice, attention_mask: torch.Tensor) -> None:
        modules = self._fusion_attention()
        b, length = attention_mask.shape
        meter = RewardMeter(0, attention_mask.bool(), self.options.reward_topk)
        seen = []

        def observe(name, q, k, v, key_padding_mask):
            rows = slice(q.shape[0] - b, q.shape[0]) if self.text_view_last else slice(0, b)
            meter.n_image = q.shape[2] - length
            meter(name, q[rows], k[rows], v[rows], None if key_padding_mask is None else key_padding_mask[rows])
            seen.append(name)
            if len(seen) == len(modules):  # one full fused pass observed: disarm
                for m in modules:
                    m.observer = None

        for m in modules:
            m.observer = observe
        self.armed = (choice, meter, attention_mask.bool())

    def agent_metrics(self) -> dict[str, torch.Tensor]:
        """The latest PPO statistics (``AGENT_METRICS``): the same keys every step, zeros until the first
        update (a resumed run logs what a straight one does)."""
        return self._latest(AGENT_METRICS)

    def metrics(self) -> dict[str, torch.Tensor]:
        """Hosted mode's report for the host recipe's log (``Recipe.total``): the mean return of the
        latest closed episode and the latest PPO statistics, zeros until they exist."""
        return self._latest(("reward", *AGENT_METRICS))

    def _latest(self, keys) -> dict[str, torch.Tensor]:
        zero = next(self.agent.parameters()).new_zeros(())
        return {k: self.last_metrics.get(k, zero).detach().float() for k in keys}

    def _close_episode(self) -> None:
        if self.armed is None:
            return
        choice, meter, caption = self.armed
        self.armed = None
        for m in self._fusion_attention():
            m.observer = None
        if len(meter.layers) != len(self._fusion_attention()):
            return  # the recipe did not run the text view (e.g. a loss switched off): no episode
        _, returns = self.compute_return(meter, choice.mask, caption, update_scale=True)
        self.finish(choice, returns)
        self.last_metrics = {**self.last_metrics, "reward": returns.mean().detach()}

    # -- rewards --------------------------------------------------------------------------------

    def compute_return(self, meter: RewardMeter, predict_rows: torch.Tensor, caption_rows: torch.Tensor,
                       update_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, G) for the layers ``meter`` observed; "running" updates its scale when ``update_scale``."""
        o = self.options
        layers = meter.stacked()
        if o.reward_layer_norm == "running":
            # a layer whose mean is not finite (fp16 overflow in the attention) leaves its scale alone:
            # one inf would zero that layer's rewards for good (checked on the device, no host sync)
            means = layer_means(layers, meter.row_mask)
            finite = torch.isfinite(means)
            if self.reward_scale is None or self.reward_scale.shape != means.shape:
                self.reward_scale = torch.where(finite, means, torch.ones_like(means))
            elif update_scale:
                m, scale = o.reward_norm_momentum, self.reward_scale.to(means.device)
                self.reward_scale = torch.where(finite, m * scale + (1 - m) * means, scale)
        return episode_return(layers, meter.row_mask, predict_rows, caption_rows, o.reward_layer_norm,
                              None if self.reward_scale is None else self.reward_scale.to(layers.device))

    def finish(self, choice: MaskChoice, returns: torch.Tensor) -> None:
        """Attach G [B] to the rollout of ``choice`` and queue it for ``learn`` (at once with
        ``update_delay=0``, else after the next selection)."""
        if choice.rollout is None:  # the random baseline, or nothing to learn
            return
        choice.rollout.returns = returns.detach().float()
        self.pending.append(choice.rollout)
        if self.options.update_delay == 0:
            self.learn()

    # -- learning -------------------------------------------------------------------------------

    def learn(self) -> None:
        """PPO on every queued rollout. Called by ``select`` right after it sampled, so the update
        starts from the parameters that just acted and can run while the main model trains on that
        batch, and by ``finish`` with ``update_delay=0``. On CUDA it is queued on the side stream and
        returns at once; on CPU it runs in order. ``join`` publishes its statistics, so what a step logs
        does not depend on where the update ran."""
        due, self.pending = self.pending, []
        if not due:
            return
        device = next(self.agent.parameters()).device
        with self._beside_main(device, due):
            for rollout in due:
                self.unpublished_metrics = self.ppo_update(rollout)

    @contextlib.contextmanager
    def _beside_main(self, device: torch.device, rollouts: list[Rollout]):
        """Run the block on the side stream after the main stream's work so far (CUDA), else inline.
        The rollouts' tensors were made on the main stream and are freed after the block: marked as used
        by the side stream so the caching allocator does not hand their memory out while it still reads
        them."""
        if device.type != "cuda":
            yield
            return
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(device)
        self.side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self.side_stream):
            yield
        for t in (t for ro in rollouts for t in ro.tensors()):
            if t.is_cuda:  # rollouts restored from a checkpoint are CPU tensors
                t.record_stream(self.side_stream)

    def join(self) -> None:
        """Make the current CUDA stream wait for the agent's queued learning, then publish its
        statistics to ``last_metrics``."""
        if self.side_stream is not None:
            main = torch.cuda.current_stream(self.side_stream.device)
            main.wait_stream(self.side_stream)
            # made on the side stream, read and freed on the main one: keep their memory from being
            # reused by the side stream's next update before the main stream's reads of them ran
            for t in self.unpublished_metrics.values():
                if t.is_cuda:
                    t.record_stream(main)
        # merged: keeps e.g. the hosted mode's "reward"
        self.last_metrics, self.unpublished_metrics = {**self.last_metrics, **self.unpublished_metrics}, {}

    def ppo_update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """Whole-batch PPO (appendix E). With r = exp(log pi(a|s) - log pi_old(a|s)), A = G - V(s):

            L = -mean_b min(r A, clip(r, 1-eps, 1+eps) A) - beta mean_b H + c_v mean_b (V - G)^2

        H is the unbiased entropy estimator of the composite action (sum of conditional entropies
        along the sampled trajectory, ``span_action_log_prob``). Gradients reach only the agent. Rows
        whose return is not finite (fp16 overflow in the main model) are left out of the means: one NaN
        would stay in the agent's weights for good."""
        o = self.options
        agent, optimizer = self.agent, self.agent_optimizer
        device = next(agent.parameters()).device
        r = {k: getattr(rollout, k).to(device) for k in ("image_feats", "text_feats", "text_padding", "lengths",
                                                           "returns")}
        sample = SpanSample(*(t.to(device) for t in rollout.sample))
        finite = torch.isfinite(r["returns"])
        returns = torch.where(finite, r["returns"], torch.zeros_like(r["returns"]))
        rows = finite.float().sum().clamp(min=1)

        def mean(x):  # over the rows with a finite return
            return torch.where(finite, x, 0.0).sum() / rows

        scaler = None
        if agent_compute_dtype(o.agent_precision, device) == torch.float16:
            if self.loss_scaler is None:
                self.loss_scaler = _grad_scaler(device)
            scaler = self.loss_scaler
        agent.train()
        stats = {}
        with torch.enable_grad():
            for _ in range(o.ppo_epochs):
                if o.agent_passes == "per_span":
                    log_prob, entropy, value = self.per_span_passes(r["image_feats"], r["text_feats"],
                                                                    r["text_padding"], r["lengths"], sample)
                else:
                    out = self.run_agent(r["image_feats"], r["text_feats"], r["text_padding"])
                    p, s, q = self.distributions(out, r["lengths"])
                    log_prob, entropy = span_action_log_prob(p, s, r["lengths"], o.quota, sample, order_scores=q,
                                                             order=o.order)
                    value = out.value
                advantage = returns - value.detach()
                ratio = torch.exp(log_prob - sample.log_prob)
                clipped = ratio.clamp(1 - o.ppo_clip, 1 + o.ppo_clip)
                policy_loss = -mean(torch.minimum(ratio * advantage, clipped * advantage))
                value_loss = mean((value - returns) ** 2)
                loss = policy_loss - o.entropy_coef * mean(entropy) + o.value_coef * value_loss
                optimizer.zero_grad(set_to_none=True)
                (loss if scaler is None else scaler.scale(loss)).backward()
                _average_gradients(agent)
                if scaler is None:
                    optimizer.step()
                else:  # fused Adam reads the scale and skips an overflowed step on the device: no host sync
                    scaler.step(optimizer)
                    scaler.update()
                stats = {"agent_value_loss": value_loss.detach(), "agent_policy_loss": policy_loss.detach(),
                         "agent_entropy": mean(entropy).detach(),
                         "agent_clip_fraction": mean(((ratio - 1).abs() > o.ppo_clip).float()).detach(),
                         "agent_advantage": mean(advantage).detach()}
        return stats

    # -- checkpointing: agent, its optimizer, reward scale and the pending rollouts -------------

    def agent_state(self) -> dict:
        """The whole policy state: the agent, its optimizer and loss scaler (the same on every rank)
        and ``rank_state``."""
        self.join()
        return {"agent": {k: _cpu(v) for k, v in self.agent.state_dict().items()},
                "agent_image_rows": self.agent.image_rows,
                "agent_image_input": self.agent.image_input,
                "agent_passes": self.options.agent_passes,
                "optimizer": self.agent_optimizer.state_dict(),
                "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
                **self.rank_state()}

    def rank_state(self) -> dict:
        """What differs between ranks: the pending rollouts (this rank's slice of the batch), the running
        reward scale (from this rank's batches) and the metrics carried between steps. ZeRO 0-2 write the
        module state from rank 0, so the trainer also saves this per rank and restores it to its rank
        (``Recipe.rank_state``)."""
        self.join()

        def rollout_state(ro: Rollout) -> dict:
            return {"image_feats": _cpu(ro.image_feats), "text_feats": _cpu(ro.text_feats),
                    "text_padding": _cpu(ro.text_padding), "lengths": _cpu(ro.lengths),
                    "sample": [_cpu(t) for t in ro.sample], "returns": _cpu(ro.returns), "step": ro.step}

        return {"reward_scale": _cpu(self.reward_scale),
                "pending": [rollout_state(ro) for ro in self.pending],
                # reported metrics carried between steps, so a resumed run logs what a straight one does
                "last_metrics": {k: _cpu(v) for k, v in self.last_metrics.items()},
                "last_random_return": _cpu(self.last_random_return)}

    def load_agent_state(self, state: dict) -> None:
        self.join()
        # the same weights compute a different function (or do not fit) in another mode; checkpoints from
        # before these options have joint layers and a Linear image input
        modes = (("agent_image_rows", "updated", self.agent.image_rows, len(self.agent.layers) > 1),
                 ("agent_image_input", "linear", self.agent.image_input, True),
                 ("agent_passes", "once", self.options.agent_passes, True))
        for option, before, asked, matters in modes:
            saved = state.get(option, before)
            if saved != asked and matters:
                raise ConfigError(f"this checkpoint's masking agent was trained with method.options.{option}="
                                  f"'{saved}', the run asks for '{asked}': set it to '{saved}' to resume this agent")
        device = next(self.agent.parameters()).device
        self.agent.load_state_dict(self._upgrade_value_head(state))
        self.agent_optimizer.load_state_dict(state["optimizer"])
        scaler = state.get("loss_scaler")  # absent in checkpoints from before agent_precision
        self.loss_scaler = None if scaler is None else _grad_scaler(device, scaler)
        self.load_rank_state(state)

    def load_rank_state(self, state: dict) -> None:
        self.join()
        device = next(self.agent.parameters()).device
        scale = state["reward_scale"]
        self.reward_scale = None if scale is None else scale.to(device)
        self.pending = [Rollout(ro["image_feats"], ro["text_feats"], ro["text_padding"], ro["lengths"],
                                SpanSample(*ro["sample"]), ro["returns"], ro["step"])
                        for ro in state["pending"]]
        self.last_metrics = dict(state.get("last_metrics", {}))
        self.last_random_return = state.get("last_random_return")

    def _upgrade_value_head(self, state: dict) -> dict:
        """The agent's weights of ``state``; a checkpoint from before V = m a + b (one value output) gets
        a = 0 and b = its V, so it values every state as before, with its Adam moments padded alike
        (``state["optimizer"]`` is updated in place)."""
        weights = dict(state["agent"])
        if weights["value_head.2.weight"].shape[0] != 1:
            return weights
        names = [name for name, _ in self.agent.named_parameters()]
        moments = state["optimizer"]["state"]
        for name in ("value_head.2.weight", "value_head.2.bias"):
            weights[name] = torch.cat([torch.zeros_like(weights[name]), weights[name]])
            moment = moments.get(names.index(name), {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moment:
                    moment[key] = torch.cat([torch.zeros_like(moment[key]), moment[key]])
        return weights

    def get_extra_state(self) -> torch.Tensor:
        buffer = io.BytesIO()
        torch.save(self.agent_state(), buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            state = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)
        self.load_agent_state(state)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Evaluation-only checkpoints (ZeRO 1-3 fp32 reconstruction keeps parameters and buffers only)
        # may lack the agent; it is training state, so a fresh agent is acceptable there.
        if prefix + "_extra_state" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)


def _tags(word_mask: torch.Tensor) -> torch.Tensor:
    """[B, L-1] word columns -> [B, L] caption columns ([CLS] never tagged)."""
    return F.pad(word_mask, (1, 0))


def _order_steps(span_id: torch.Tensor, order_scores: Optional[torch.Tensor], order: str,
                 generator: torch.Generator) -> torch.Tensor:
    """Factorization steps [B, L] of the spans in ``span_id`` (``sample_spans``' step 4): Plackett-Luce
    over the start scores ("learned") or a uniform permutation ("random") drawn as the descending sort of
    score + Gumbel noise (the same law as stagewise draws), by start position ("left_to_right"), or 1."""
    mask = span_id > 0
    is_start = mask & (F.pad(span_id, (1, 0))[:, :span_id.shape[1]] != span_id)
    if order == "single":
        return mask.long()
    if order == "left_to_right":
        return torch.where(mask, is_start.long().cumsum(1), 0)
    score = order_scores.float() if order == "learned" else torch.zeros(span_id.shape, device=span_id.device)
    uniform = torch.rand(span_id.shape, generator=generator, device=span_id.device).clamp(1e-20, 1 - 1e-7)
    key = torch.where(is_start, score - torch.log(-torch.log(uniform)), float("-inf"))
    rank = key.argsort(1, descending=True).argsort(1) + 1  # starts first, by key
    step_of_span = torch.zeros(span_id.shape[0], span_id.shape[1] + 1, dtype=torch.long, device=span_id.device)
    step_of_span.scatter_(1, torch.where(is_start, span_id, 0), torch.where(is_start, rank, 0))
    step_of_span[:, 0] = 0
    return step_of_span.gather(1, span_id)


def _cpu(value):
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _grad_scaler(device: torch.device, state: Optional[dict] = None) -> torch.amp.GradScaler:
    """The fp16 agent's loss scaler on ``device`` (with ``state`` from another device or a checkpoint)."""
    scaler = torch.amp.GradScaler(device.type)
    if state:
        scaler.load_state_dict(state)
    return scaler


def _average_gradients(module: nn.Module) -> None:
    """Whole-batch update over the global batch: average the agent's gradients across ranks."""
    _, world = rank_and_world()
    if world == 1:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per parameter
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def build_curriculum(cfg: RunConfig, recipe, options: Optional[CurriculumOptions] = None) -> CurriculumMasking:
    """The policy for ``recipe``. A recipe that drives the agent itself (cmask) provides
    ``curriculum_widths()``; any other recipe with an ALBEF-layout backbone (``encode_image``,
    ``encode_text``, a ``fusion_encoder`` with self-attention over [image | text], e.g. MAMO) hosts it
    (``CurriculumMasking.attach_host``) with the paper's defaults, except quota =
    ``method.mlm_probability`` and order "single" (that recipe's MLM predicts in one step)."""
    m = cfg.model
    widths = getattr(recipe, "curriculum_widths", None)
    if widths is not None:
        image_width, text_width = widths()
        return CurriculumMasking(options or CurriculumOptions(), image_width=image_width, text_width=text_width,
                                 width=m.text_width, heads=m.text_heads, intermediate=m.text_intermediate,
                                 seed=cfg.train.seed)
    backbone = getattr(recipe, "backbone", None)
    fusion = getattr(backbone, "fusion_encoder", None)
    if backbone is None or fusion is None or not hasattr(backbone, "encode_text") or \
            not hasattr(fusion, "text_offset"):
        raise ConfigError(f"method.text_masking='curriculum' needs a recipe that provides the agent's shared "
                          f"features and a single-stream fusion to measure the reward in (cmask, mamo); "
                          f"recipe '{cfg.method.name}' does not")
    from . import special_tokens

    options = options or CurriculumOptions(quota=cfg.method.mlm_probability, order="single")
    policy = CurriculumMasking(options, image_width=m.vision_width, text_width=m.text_width, width=m.text_width,
                               heads=m.text_heads, intermediate=m.text_intermediate, seed=cfg.train.seed)
    policy.attach_host(recipe, special_tokens(cfg))
    return policy


__all__ = ["AGENT_METRICS", "AgentOutput", "CurriculumMasking", "CurriculumOptions", "Episode", "IGNORE_INDEX",
           "MaskChoice", "MaskingAgent", "Played", "RewardMeter", "Rollout", "agent_compute_dtype", "build_curriculum", "episode_return",
           "layer_means"]
