"""A trained run as a model folder anyone can load, and the inference API over it.

``fastvl export RUN --out DIR`` (RUN: a run directory, a step_<N> folder or a weights file) writes::

    DIR/model.safetensors   fp32 state dict of the recipe that scores retrieval (EPIC: its base recipe;
                            the saliency teacher and the generator are training-only), the config, the
                            step and every LayerNorm's epsilon in the safetensors metadata
    DIR/config.json         the resolved RunConfig, with model.text_init / model.image_init null (the
                            exported weights replace them) and data.tokenizer "." (this folder)
    DIR/vocab.txt, DIR/tokenizer.json, ...   the tokenizer the run used
    DIR/text/               the unimodal text encoder as a Hugging Face ``BertModel`` folder (config.json,
                            model.safetensors, tokenizer files): embeddings + the first ``text_layers``
                            layers. The fusion layers are not in it (a BertModel has no cross-attention)
                            and neither is the pooler (fastvl has none: ``pooler_output`` is untrained);
                            ``last_hidden_state`` equals fastvl's text encoder states.

Whole-recipe weights (rather than the backbone alone) keep every recipe's own scorer (MAMO's concatenated
fusion, C-Mask's ITC-only scoring) and let ``fastvl eval --checkpoint DIR`` read an export; C-Mask's
serialized agent (``_extra_state``, training state) is left out. ``export`` rebuilds the folder's model and
checks that it embeds and scores a probe batch exactly as the trained recipe does.

``fastvl.load(DIR)`` -> ``VisionLanguageModel`` with ``encode_image``, ``encode_text`` and ``itm_score``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .config import ConfigError

WEIGHTS = "model.safetensors"
TEXT_FOLDER = "text"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------
# export


def inference_recipe(recipe):
    """The recipe whose weights and config an export holds: EPIC scores with its base recipe (its
    teacher, generator and consistency head only train), every other recipe with itself."""
    if recipe.cfg.method.name == "epic":
        return recipe.base
    return recipe


def exported_config(cfg) -> dict:
    """``cfg`` as the export's config.json: pretrained inits cleared (the weights hold them), the
    tokenizer in the export folder, no frozen prefixes (training only)."""
    from .train.checkpoint import without_pretrained_inits

    config = without_pretrained_inits(cfg).to_dict()
    config["data"]["tokenizer"] = "."
    config["train"]["freeze"] = []
    return config


def export(checkpoint: str, out: str | Path, progress: bool = True) -> Path:
    """Write the model folder of ``checkpoint`` to ``out`` (a new or empty folder); returns it."""
    from .data.tokenizer import tokenizer_folder
    from .train.checkpoint import layer_norm_eps, load_recipe, write_weights

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty: choose a new folder")
    trained, _, step = load_recipe(checkpoint)
    recipe = inference_recipe(trained)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v for k, v in recipe.state_dict().items() if not k.endswith("_extra_state")}
    config = exported_config(recipe.cfg)
    write_weights(out / WEIGHTS, state_dict, config, step, export="1",
                  layer_norm_eps=json.dumps(layer_norm_eps(recipe)))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    copy_tokenizer(tokenizer_folder(recipe.cfg.data.tokenizer), out)
    check_rebuild(recipe, out)
    text_note = export_text_encoder(recipe, out / TEXT_FOLDER)
    if progress:
        print(f"exported {recipe.cfg.method.name} (step {step}) to {out}" + (f"; {text_note}" if text_note else ""))
    return out


def copy_tokenizer(source: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)


def probe_inputs(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two normalised images and two random token rows (the second one padded) to compare models on."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, cfg.model.image_size, cfg.model.image_size, generator=g)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return images, ids, mask


@torch.no_grad()
def scores_of(recipe, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    scorer = recipe.scorer
    image_feat, image_states = scorer.image_embeddings(images)
    text_feat, text_states = scorer.text_embeddings(ids, mask)
    return [image_feat, text_feat, scorer.itm_scores(image_states, text_states, mask)]


def check_rebuild(recipe, out: Path) -> None:
    """Load ``out`` as ``fastvl.load`` does and require the trained recipe's embeddings and ITM scores on a
    probe batch (exact fp32 arithmetic: same weights, same ops)."""
    from .train.checkpoint import load_recipe

    rebuilt, _, _ = load_recipe(str(out))
    inputs = probe_inputs(recipe.cfg)
    was_training = recipe.training
    recipe.eval()
    for name, want, got in zip(("image embedding", "text embedding", "ITM score"),
                               scores_of(recipe, *inputs), scores_of(rebuilt, *inputs)):
        if not torch.allclose(want, got, rtol=0, atol=1e-6):
            raise ConfigError(f"export {out}: the rebuilt model's {name} differs from the trained recipe's by "
                              f"{(want - got).abs().max().item():.3g} — something the config does not describe "
                              f"changed the model; please report it")
    recipe.train(was_training)


def hf_bert_config(text_encoder, pad_token_id: int) -> dict:
    """A transformers ``BertConfig`` (as a dict) describing fastvl's ``TextEncoder``."""
    layers = text_encoder.encoder.layer
    norms = {m.eps for m in text_encoder.modules() if isinstance(m, nn.LayerNorm)}
    if len(norms) != 1:
        raise ConfigError(f"the text encoder's LayerNorms use several epsilons {sorted(norms)}; a BertModel has one")
    emb = text_encoder.embeddings
    return {
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": emb.word_embeddings.num_embeddings, "hidden_size": text_encoder.width,
        "num_hidden_layers": len(layers), "num_attention_heads": layers[0].attention.self.heads if len(layers) else 1,
        "intermediate_size": layers[0].intermediate.dense.out_features if len(layers) else 4 * text_encoder.width,
        "hidden_act": "gelu", "max_position_embeddings": emb.position_embeddings.num_embeddings,
        "type_vocab_size": emb.token_type_embeddings.num_embeddings, "layer_norm_eps": norms.pop(),
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "pad_token_id": pad_token_id,
        "position_embedding_type": "absolute",
    }


def export_text_encoder(recipe, out: Path) -> Optional[str]:
    """Write the backbone's unimodal text encoder as a BertModel folder; returns a note when the recipe's
    text tower is not a BERT encoder (C-Mask's multiway backbone) and nothing was written."""
    from safetensors.torch import save_file

    from .data.tokenizer import load_tokenizer
    from .models.bert import TextEncoder

    text_encoder = getattr(recipe.backbone, "text_encoder", None)
    if not isinstance(text_encoder, TextEncoder):
        return (f"no {TEXT_FOLDER}/ BertModel: the {type(recipe.backbone).__name__} backbone has no BERT text "
                f"encoder (its text path shares multiway blocks with the image)")
    out.mkdir()
    tokenizer = load_tokenizer(str(out.parent))
    config = hf_bert_config(text_encoder, tokenizer.pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in text_encoder.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    copy_tokenizer(out.parent, out)
    return None


# ---------------------------------------------------------------------------------------------
# inference

ImageInput = Union[torch.Tensor, Sequence]


class VisionLanguageModel:
    """A loaded fastvl model: unit-norm ITC embeddings of images and texts, and ITM match probabilities.

    Images (``encode_image``, ``itm_score``) may be:

    - a list of PIL images (any mode: converted to RGB, transparency composited on white, as the data
      pipeline does) or of uint8 ``[3, H, W]`` tensors, or one uint8 ``[B, 3, H, W]`` tensor: each goes
      through the eval transform of the exported config (``eval.resize``: by default the whole image
      resized to ``image_size`` x ``image_size``, bicubic, as ALBEF evaluates; ImageNet normalisation);
    - a float ``[B, 3, S, S]`` tensor: taken as already transformed and normalised (S = ``image_size``).

    Texts are tokenised with the exported tokenizer and truncated to ``data.max_text_len`` tokens.
    """

    def __init__(self, recipe, cfg, step: int, device: torch.device):
        from .data.tokenizer import load_tokenizer
        from .data.transforms import EvalTransform

        self.recipe, self.cfg, self.step, self.device = recipe, cfg, step, device
        self.scorer = recipe.scorer
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.transform = EvalTransform(cfg.data.image_size, cfg.eval.resize)
        self.image_size = cfg.data.image_size
        self.max_text_len = cfg.data.max_text_len

    def images_tensor(self, images: ImageInput) -> torch.Tensor:
        """``images`` as the normalised float ``[B, 3, S, S]`` batch the model reads."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.dim() != 4 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
                raise ValueError(f"a float image tensor must be normalised [B, 3, {self.image_size}, "
                                 f"{self.image_size}]; got {tuple(images.shape)} (pass uint8 pixels to resize)")
            return images.to(self.device, torch.float32)
        if isinstance(images, torch.Tensor):
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"an image tensor must be uint8 [B, 3, H, W] or float [B, 3, S, S]; "
                                 f"got {images.dtype} {tuple(images.shape)}")
            images = list(images)
        if not images:
            raise ValueError("encode_image needs at least one image")
        return torch.stack([self.transform(self._pixels(image))[0] for image in images]).to(self.device)

    @staticmethod
    def _pixels(image) -> torch.Tensor:
        """uint8 ``[3, H, W]`` of a PIL image or a uint8 tensor."""
        if isinstance(image, torch.Tensor):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"each image tensor must be uint8 [3, H, W]; got {image.dtype} {tuple(image.shape)}")
            return image
        from PIL import Image

        from .data.images import pil_to_rgb

        if not isinstance(image, Image.Image):
            raise ValueError(f"images must be PIL images or uint8 tensors, got {type(image).__name__}")
        return pil_to_rgb(image)

    def _tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .data.tokenizer import encode

        if isinstance(texts, str):
            raise ValueError("encode_text takes a list of strings")
        ids, mask = encode(self.tokenizer, list(texts), self.max_text_len)
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode_image(self, images: ImageInput) -> torch.Tensor:
        """Unit-norm ITC embeddings ``[B, E]`` (float32, on CPU)."""
        return self.scorer.image_embeddings(self.images_tensor(images))[0].float().cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm ITC embeddings ``[B, E]`` (float32, on CPU) of the captions ``texts``."""
        return self.scorer.text_embeddings(*self._tokens(texts))[0].float().cpu()

    @torch.no_grad()
    def itm_score(self, images: ImageInput, texts: Sequence[str]) -> torch.Tensor:
        """Probability ``[B]`` that ``images[i]`` matches ``texts[i]`` (aligned lists; C-Mask, which has no
        ITM head, maps the ITC cosine to [0, 1])."""
        pixels = self.images_tensor(images)
        ids, mask = self._tokens(texts)
        if len(pixels) != len(ids):
            raise ValueError(f"itm_score pairs images and texts row by row: got {len(pixels)} images and {len(ids)} texts")
        _, image_states = self.scorer.image_embeddings(pixels)
        _, text_states = self.scorer.text_embeddings(ids, mask)
        return self.scorer.itm_scores(image_states, text_states, mask).float().cpu()


def load(path: str | Path, device: Optional[str | torch.device] = None) -> VisionLanguageModel:
    """Load an exported folder (``fastvl export``) — or a run directory, step_<N> folder or weights file —
    for inference. Only safetensors and weights-only checkpoints are read: a file that would unpickle
    objects raises ``ConfigError``."""
    from .train.checkpoint import load_recipe

    device = torch.device(device) if device is not None else torch.device("cpu")
    recipe, cfg, step = load_recipe(str(path), device=device)
    return VisionLanguageModel(recipe, cfg, step, device)


def main(argv: Optional[list[str]] = None, prog: str = "fastvl export") -> int:
    """``fastvl export RUN --out DIR``; exit code 2 with one line on a ConfigError."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=prog, description="write a run's model as safetensors + config + "
                                                            "tokenizer (+ a Hugging Face BertModel of the text encoder)")
    parser.add_argument("checkpoint", metavar="RUN", help="run directory, RUN/step_N or a weights file")
    parser.add_argument("--out", required=True, help="new (or empty) output folder")
    args = parser.parse_args(argv)
    try:
        export(args.checkpoint, args.out)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0
