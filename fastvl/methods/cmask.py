"""C-Mask (paper 000): curriculum masking by a PPO agent that maximises cross-modal interaction.

Paper -> code:

=====================================================  ==================================================
Sec. 3.4 / app. C: 12-layer multiway transformer       ``models/multiway.MultiwayModel`` (``backbone="multiway"``;
(VLMo), ITC head for retrieval                         ``layers``/``vl_layers``); ITC = ``objectives.itc``
App. C: init from unimodal checkpoints                 ``model.image_init`` (a ViT: patch embedding, positions, the
                                                       shared attention, the vision experts), ``model.text_init``
                                                       (a BERT: embeddings, text experts, MLM head); VL experts new
App. H: dual-stream mount                              ``backbone="albef"``: ``models/albef.AlbefModel``; the GLM
                                                       runs in its text + fusion encoders (kind/step rule), the
                                                       reward in the fusion cross-attention
Eq. 3 / app. I: generalized LM, pseudo masks           ``objectives/glm.build_glm_inputs`` + ``glm_loss``
                                                       (``objective="glm"``; ``"mlm"`` = [MASK] in place)
Eq. 4: value-weighted top-8 reward per head/layer      ``masking/curriculum.RewardMeter`` (observer on the
                                                       joint attention) -> ``fastvl_kernels.value_weighted_topk_reward``
"normalized layerwise, averaged"                       ``episode_return`` (``reward_layer_norm``, see below)
Sec. 3.3: G = sum_masked R + mean_all R                ``episode_return``: prediction rows (pseudo masks, or
                                                       in-place [MASK]s) + the mean over the caption's real rows
Eq. 2: p (softmax), s (sigmoid), q, quota 50%          ``MaskingAgent`` + ``fastvl_kernels.sample_spans``
Sec. 3.2: agent re-run per span, <m> </m> tags         ``agent_passes="per_span"`` (default "once", see below)
App. E: PPO clip 0.2, beta 0.1, lr 1e-4, whole batch   ``CurriculumMasking.ppo_update``
App. E: AdamW lr 5e-4, min 0, 10k warm-up, eps 1e-6,   configs/base_cmask.json ``train.lr``, ``min_lr_ratio``,
betas (0.9, 0.98), clip 1.5, wd 0.05                   ``warmup_steps``, ``adam_eps``, ``betas``, ``grad_clip``,
                                                       ``weight_decay``; the decay shape is not stated: cosine
Fig. 2: agent shares the first half of the layers      the shared features are the main model's own hidden states
                                                       after ``shared_layers`` blocks of its unimodal (ITC)
                                                       passes, detached: no extra backbone compute and no
                                                       gradient from the agent into the backbone
Table 9 ablations                                      options ``mask_selection`` / ``spans`` / ``order`` /
                                                       ``objective`` (table below)
=====================================================  ==================================================

Table 9 rows as options (everything else default):

- learned mask selection only: ``spans="none", order="single"``
- random spans only: ``mask_selection="random", spans="random", order="single"``
- learned mask + span selection: ``order="single"``
- random spans + random order: ``mask_selection="random", spans="random", order="random"``
- learned spans + random order: ``order="random"``
- random spans + learned order: ``mask_selection="random", spans="random"`` (order learned)
- full model: defaults
- vanilla MLM baseline: ``objective="mlm", mask_selection="random", spans="none", order="single", quota=0.15``
- left-to-right LM (a special case): ``mask_selection="random", spans="none", order="left_to_right", quota=1.0``

Agent passes (``agent_passes``): the paper re-runs the agent after each token/span it picks, with
<m> </m> tags around the masked positions, until the quota is met, then picks the order from q.
``"per_span"`` does so: pass k sees spans 1..k-1 tagged (a learned vector added to those caption rows at
the agent's input; the shared features stay those of the unmasked caption, not re-run per span), draws
span k from its own p and s, and a pass with every span tagged gives q. The log-prob sums each span's
terms under the pass that drew it; PPO recomputes exactly these, all passes batched in one agent call
(``CurriculumMasking.per_span_passes``). ``"once"`` (default) runs the agent once per batch and
``fastvl_kernels.sample_spans`` draws the spans one after another from that pass's p and s, each draw
excluding what is masked: a later span depends on the earlier ones through what they exclude, not through
a tagged caption. The default is "once" because per-span costs one agent pass per span at sampling and
again, with gradients, in PPO: at tiny size 1.46x the step time and 1.47x the FLOPs of "once" (10-13x the
agent's own), more at base size (4 agent layers, ~10 spans per 40-token caption), for a learned/random
reward of 1.000 in both modes on the built-in data (``python -m bench.bench_cmask_passes``).

Choices where the paper is vague (all config values):

- Shared features: the paper's agent reads the first 6 layers of the main model on the (unmasked)
  input. Here they are the multiway model's first ``shared_layers`` blocks of the image-only and
  text-only passes that ITC runs anyway (VLMo's unimodal passes), detached; in the agent's own layers
  the caption then attends over ``[image | caption]`` (see below). On ALBEF they are the ViT output and the text
  encoder output (BERT's first half). With ITC off the shared blocks run under ``no_grad``.
- Reward rows: the pseudo-mask rows for the masked tokens ("sum over masked", one row per masked
  token) and every real caption row for the mean; sources: every image token ([CLS] + patches).
  Layers: every block of the fused pass (multiway) / every fusion cross-attention (ALBEF).
- Layerwise normalisation: a running mean per layer (``reward_layer_norm="running"``), see
  ``masking/curriculum.py``.
- Schedule: masks of batch t are sampled at the start of forward(t) by the agent after the updates
  so far; right after, PPO learns from batch t-1's rollout (``update_delay=1``) with the parameters
  that just sampled; with ``update_delay=0`` it learns from batch t once its reward is in. The waiting
  rollout (its masks, order, log-probs, returns and the agent's inputs) is checkpointed with the agent
  and its optimizer (``get_extra_state`` of the policy). On CUDA the PPO update is queued on a side
  stream and runs beside the rest of step t (the GLM forward, backward and optimizer step) and step
  t+1's shared-layer forward, until ``select`` needs the agent; on CPU it runs in order (same results).
- Sampling seeds depend on (train.seed, step, rank), the step counted in micro-batches (``draw_step``):
  the masks are reproducible and resume exactly, but unlike the recipes' ``global_uniform`` draws they
  change with the number of processes.
- The agent's value head reads the mean of the caption's real rows of its last layer, which computes
  the caption rows only (every head reads the caption; see ``MaskingAgent``), and gives V = m a + b
  with m the tokens the quota masks: G sums R over those m tokens, so V follows its growth with the
  caption's length, which a mean-pooled state hardly shows.
- The agent's own layers (``agent_image_rows``): the paper gives their number (3-4), not their kind.
  By default ("fixed") each is a fusion layer as in its Fig. 2 layout: the caption rows attend over
  ``[image | caption]`` and are updated, while the image rows stay the shared features, read as keys
  and values in every layer. Every head reads the caption, so nothing is lost that a head reads, and
  at base size (197 image rows per 40 caption rows) the agent costs 0.37x the FLOPs of joint layers
  that also update the image rows ("updated"). With one agent layer (tiny) the two are the same.
- How the agent reads the shared features (``agent_image_input``): the paper's agent continues the main
  model's layer stack, with no adapter between. Here the caption enters through a Linear, and the
  image through a LayerNorm ("norm"), the way a pre-norm multiway block reads its input. With fixed image
  rows the norm's scale and shift fold into every layer's key/value projection, where an image Linear
  ("linear", the earlier default) would add its own product and a gradient back through every layer's
  projection of every image row: 14% of the agent's FLOPs at base size with 40-token captions.
- Agent precision (``agent_precision``): fp32 weights and Adam; on CUDA its layers compute in bf16
  (fp16 with its own loss scaler where bf16 is missing) beside the half-precision main model, so the
  side stream can keep up with the main step; on CPU bf16 where it is native, else fp32.
- Advantage = G - V(s) with V from the current agent (detached), no normalisation; value loss MSE
  with weight ``value_coef`` in one Adam step. Rows whose G is not finite (fp16 overflow) are left out.
- No ITM head (the paper adds only ITC for retrieval); the scorer ranks by ITC (``itm_scores`` is the
  ITC cosine mapped to [0, 1], so eval's re-ranking keeps the ITC order).

Composition: ``method.text_masking="curriculum"`` in another recipe with an ALBEF-layout backbone and a
single-stream fusion encoder (MAMO) builds the same policy in *hosted* mode
(``CurriculumMasking.attach_host``): the agent reads that recipe's ViT + text-encoder outputs (an extra
no_grad pass), masks in place for its one-step MLM at ``method.mlm_probability``, measures the reward on
the next fusion pass with a one-shot observer and learns at the next masking call. That recipe logs the
policy's ``reward`` and PPO statistics as ``text_masking/<name>`` (``Recipe.total``).

Metrics per step: ``reward`` (mean G of the learned masks), ``reward_per_token`` (mean R of the
predicted tokens), ``reward_random`` (G of a random same-quota mask on the same batch, measured every
``random_reward_every`` steps and carried between), ``policy_entropy`` (the composite action's
entropy estimate), ``agent_value_loss``, ``agent_clip_fraction``, ``agent_entropy`` (from the latest
PPO update), ``masked_fraction``.

Every ZeRO stage 0-3 works: under stage 3 the backbones declare the parameters they read outside a
forward of their own (``zero3_external_parameters``: the tied MLM decoder, the multiway image tokens),
and the agent, outside the module tree, stays whole on every rank. The masks depend on the number of
processes (the span draws are seeded per rank), so 2 processes do not log what 1 process logs at any
stage; at ZeRO-3 they log what they log at ZeRO-0 (tests/methods/test_zero3.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError, RunConfig, build_section
from ..data.batch import Batch
from ..masking import special_tokens
from ..masking.curriculum import CurriculumMasking, CurriculumOptions, MaskChoice, Played, RewardMeter
from ..models.albef import AlbefModel
from ..models.multiway import MultiwayModel
from ..objectives.glm import GlmInputs, build_glm_inputs, glm_loss
from ..objectives.itc import itc_loss
from .base import Recipe, temperature_parameter

BACKBONES = ("multiway", "albef")
OBJECTIVES = ("glm", "mlm")


@dataclass
class CMaskOptions(CurriculumOptions):
    backbone: str = "multiway"
    """"multiway" (single stream, the paper's main model) or "albef" (dual stream, appendix H)."""
    layers: Optional[int] = None
    """Multiway blocks; None = model.text_layers + model.fusion_layers (tiny 4, base 12)."""
    vl_layers: int = 2
    """Top multiway blocks with a vision-language expert (VLMo base: 2 of 12)."""
    objective: str = "glm"
    """"glm" (pseudo masks, factorization order) or "mlm" ([MASK] in place, one step)."""

    def __post_init__(self):
        super().__post_init__()
        if self.backbone not in BACKBONES:
            raise ConfigError(f"method.options.backbone must be one of {BACKBONES}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"method.options.objective must be one of {OBJECTIVES}")
        if self.objective == "mlm" and self.order not in ("single",):
            raise ConfigError("method.options.objective='mlm' predicts everything in one step: set order='single'")


class CMask(Recipe):
    default_losses = {"itc": 1.0, "glm": 1.0}

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.options = build_section(CMaskOptions, cfg.method.options, "method.options")
        o = self.options
        self.special = special_tokens(cfg)
        if cfg.model.text_pooling != "cls":
            raise ConfigError("model.text_pooling: C-Mask's ITC reads the text [CLS] row, as the paper does; "
                              "set model.text_pooling=cls")
        if o.backbone == "multiway":
            self.backbone = MultiwayModel(cfg.model, o.layers, o.vl_layers)
            total = self.backbone.num_layers
            image_width = text_width = self.backbone.width
        else:
            self.backbone = AlbefModel(cfg.model)
            total = cfg.model.text_layers
            image_width, text_width = cfg.model.vision_width, cfg.model.text_width
        self.shared_layers = total // 2 if o.shared_layers is None else o.shared_layers
        if self.shared_layers > total:
            raise ConfigError(f"method.options.shared_layers ({self.shared_layers}) exceeds the {total} "
                              f"shareable layers")
        self.temperature = temperature_parameter(cfg.method.temperature)
        if cfg.method.text_masking not in ("random", "curriculum"):
            raise ConfigError("cmask masks text with its curriculum agent: method.text_masking must be 'curriculum' "
                              "(or the default 'random', read as 'curriculum')")
        self.curriculum = CurriculumMasking(o, image_width=image_width, text_width=text_width,
                                            width=cfg.model.text_width, heads=cfg.model.text_heads,
                                            intermediate=cfg.model.text_intermediate, seed=cfg.train.seed)

    def curriculum_widths(self) -> tuple[int, int]:
        return self.curriculum.agent.image_width, self.curriculum.agent.text_in.in_features

    # -- pieces ---------------------------------------------------------------------------------

    def contrastive(self, image_states, text_states):
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        loss, _, _ = itc_loss(self.backbone.image_feat(image_states), self.backbone.text_feat(text_states),
                              self.temperature)
        return loss

    def shared_features(self, batch: Batch, need_itc: bool):
        """(itc loss or None, image features, text features, image states for the ALBEF fusion)."""
        bb, k = self.backbone, self.shared_layers
        if self.options.backbone == "albef":
            image_states = bb.encode_image(batch.images)
            text_states = bb.encode_text(batch.input_ids, batch.attention_mask)
            itc = self.contrastive(image_states, text_states) if need_itc else None
            return itc, image_states.detach(), text_states.detach(), image_states
        if need_itc:
            image_states, image_half = bb.encode_image(batch.images, capture=k)
            text_states, text_half = bb.encode_text(batch.input_ids, batch.attention_mask, capture=k)
            return self.contrastive(image_states, text_states), image_half.detach(), text_half.detach(), None
        if not self.options.learns:  # random masking: the agent's features are not needed
            return None, None, None, None
        with torch.no_grad():
            image = bb.embed_image(batch.images)
            image_half = bb.run(image, image.shape[1], stop=k)
            text_half = bb.run(bb.embed_text(batch.input_ids), 0, batch.attention_mask.bool(), stop=k)
        return None, image_half, text_half, None

    def glm_inputs(self, batch: Batch, choice: MaskChoice) -> GlmInputs:
        return build_glm_inputs(batch.input_ids, batch.attention_mask, choice.mask, choice.step,
                                mask_id=self.special.mask, pseudo=self.options.objective == "glm")

    def generalized_lm(self, batch: Batch, glm: GlmInputs, image_states=None, measure: bool = True):
        """(text-side output states [B, T, W], RewardMeter or None) of the main model on the GLM sequence;
        ``measure`` installs the reward observer."""
        bb = self.backbone
        observe = (lambda meter: bb.observing(meter)) if measure else (lambda meter: contextlib.nullcontext())
        if self.options.backbone == "albef":
            meter = RewardMeter(0, glm.attention_mask, self.options.reward_topk,
                                accept=lambda name: "crossattention" in name, cross=True) if measure else None
            states = bb.encode_text(glm.input_ids, glm.attention_mask, glm.position_ids, kind=glm.kind, step=glm.step)
            with observe(meter):
                fused = bb.fuse(states, glm.attention_mask, image_states, kind=glm.kind, step=glm.step)
            return fused, meter
        image = bb.embed_image(batch.images)
        n_image = image.shape[1]
        meter = RewardMeter(n_image, glm.attention_mask, self.options.reward_topk) if measure else None
        with observe(meter):
            states = bb.encode_joint(image, bb.embed_text(glm.input_ids, glm.position_ids), glm.attention_mask,
                                     glm.kind, glm.step)
        return states[:, n_image:], meter

    def caption_rows(self, batch: Batch, glm: GlmInputs) -> torch.Tensor:
        rows = torch.zeros_like(glm.attention_mask)
        rows[:, :glm.caption_length] = batch.attention_mask.bool()
        return rows

    def player(self, batch: Batch, image_states):
        """The curriculum's ``play``: the main model's GLM pass on a mask, its reward observer installed when
        asked; ``Played.output`` = (GLM inputs, text-side states) for the GLM loss."""
        def play(choice: MaskChoice, measure: bool) -> Played:
            glm = self.glm_inputs(batch, choice)
            states, meter = self.generalized_lm(batch, glm, image_states, measure)
            return Played(meter, glm.predict, self.caption_rows(batch, glm), (glm, states))

        return play

    def episode_returns(self, batch: Batch, image_feats, text_feats, image_states, draw: int,
                        random: bool = True) -> torch.Tensor:
        """G [B] of one mask per caption drawn with key ``draw`` (``CurriculumMasking.measure_returns``)."""
        return self.curriculum.measure_returns(image_feats, text_feats, batch.attention_mask,
                                               self.player(batch, image_states), draw, random)

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        losses, metrics = {}, {}
        itc, image_feats, text_feats, image_states = self.shared_features(batch, self.uses("itc"))
        if itc is not None:
            losses["itc"] = itc
        episode = self.curriculum.episode(image_feats, text_feats, batch.attention_mask,
                                          self.player(batch, image_states), draw=self.draw_step,
                                          log_step=self.current_step)
        glm, states = episode.played.output
        if self.uses("glm"):
            losses["glm"] = glm_loss(self.backbone.mlm_logits(states[glm.predict]), glm.labels[glm.predict])
        metrics.update(episode.metrics)
        metrics["temperature"] = self.temperature.reshape(())
        return self.total(losses, metrics)

    @property
    def scorer(self):
        return CMaskScorer(self)


class CMaskScorer:
    """ITC retrieval for either backbone (no ITM head: ``itm_scores`` = ITC cosine mapped to [0, 1])."""

    def __init__(self, recipe: CMask):
        self.recipe = recipe

    def image_embeddings(self, images):
        bb = self.recipe.backbone
        states = bb.encode_image(images)
        states = states[0] if isinstance(states, tuple) else states
        return bb.image_feat(states), states

    def text_embeddings(self, input_ids, attention_mask):
        bb = self.recipe.backbone
        states = bb.encode_text(input_ids, attention_mask)
        states = states[0] if isinstance(states, tuple) else states
        return bb.text_feat(states), states

    def itm_scores(self, image_states, text_states, attention_mask):
        bb = self.recipe.backbone
        cosine = (bb.image_feat(image_states).float() * bb.text_feat(text_states).float()).sum(-1)
        return (cosine + 1) / 2
