"""``fastvl export`` and ``fastvl.load``: the exported model rebuilds without the pretrained files and
embeds/scores exactly as the trained recipe; the text tower loads in transformers' BertModel with the
same states; every recipe exports; the README example runs as written."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastvl
from fastvl import cli
from fastvl.config import ConfigError, config_from_dict
from fastvl.export import VisionLanguageModel
from fastvl.methods import build_method
from fastvl.train.checkpoint import load_recipe
from tests.methods.conftest import build_recipe

from .conftest import BERT_EPS, TINY_ALBEF, save_run

CAPTIONS = ["a red circle left of a blue square", "two green triangles", "a small yellow star above a circle"]

def readme_example() -> str:
    """The README's Python block that calls ``fastvl.load``: the test runs what users read."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    found = [block for block in blocks if "fastvl.load(" in block]
    assert len(found) == 1, "the README should hold one Python example of fastvl.load"
    return found[0]


def pictures(n=3, seed=0):
    """PIL images of different sizes and modes (RGBA, RGB, L), as users pass them."""
    rng = np.random.RandomState(seed)
    shapes = [(50, 70, 4), (64, 64, 3), (90, 40)]
    modes = ["RGBA", "RGB", "L"]
    return [Image.fromarray(rng.randint(0, 256, shapes[i % 3], dtype=np.uint8), modes[i % 3]) for i in range(n)]


def assert_same_outputs(a: VisionLanguageModel, b: VisionLanguageModel, atol=1e-6):
    images = pictures()
    torch.testing.assert_close(a.encode_image(images), b.encode_image(images), atol=atol, rtol=0)
    torch.testing.assert_close(a.encode_text(CAPTIONS), b.encode_text(CAPTIONS), atol=atol, rtol=0)
    torch.testing.assert_close(a.itm_score(images, CAPTIONS), b.itm_score(images, CAPTIONS), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def albef_export(albef_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-albef"
    assert cli.main(["export", str(albef_run), "--out", str(out)]) == 0
    return out


def test_export_folder_layout_and_config(albef_export, albef_run):
    names = {p.name for p in albef_export.iterdir()}
    assert {"model.safetensors", "config.json", "vocab.txt", "tokenizer.json", "text"} <= names
    config = json.loads((albef_export / "config.json").read_text())
    assert config["model"]["text_init"] is None and config["data"]["tokenizer"] == "."
    assert config_from_dict(json.loads((albef_run / "config.json").read_text())).model.text_init is not None
    assert {p.name for p in (albef_export / "text").iterdir()} >= {"config.json", "model.safetensors", "vocab.txt"}


def test_exported_model_equals_the_trained_recipe(albef_export, albef_run):
    """The trainer's final weights, rebuilt with their pretrained init (load_recipe of the run), against
    the export rebuilt from config.json alone: same embeddings and ITM scores, and the BERT init's
    LayerNorm epsilon survives."""
    recipe, cfg, step = load_recipe(str(albef_run))
    trained = VisionLanguageModel(recipe, cfg, step, torch.device("cpu"))
    exported = fastvl.load(albef_export)
    assert exported.step == step == 2 and exported.cfg.model.text_init is None
    assert_same_outputs(trained, exported)
    norms = [m for m in exported.recipe.backbone.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == BERT_EPS for m in norms)


def test_without_the_saved_epsilons_the_rebuild_would_differ(albef_export):
    """What the export's LayerNorm epsilons repair: config.json alone rebuilds BERT's default 1e-12."""
    exported = fastvl.load(albef_export)
    plain = build_method(exported.cfg).eval()
    plain.load_state_dict(exported.recipe.state_dict())
    texts = exported.encode_text(CAPTIONS)
    naive = VisionLanguageModel(plain, exported.cfg, 0, torch.device("cpu")).encode_text(CAPTIONS)
    assert (texts - naive).abs().max() > 1e-5


def test_hugging_face_text_folder_matches_the_text_encoder(albef_export):
    from transformers import AutoModel, AutoTokenizer

    model = fastvl.load(albef_export)
    hf = AutoModel.from_pretrained(albef_export / "text").eval()
    tokenizer = AutoTokenizer.from_pretrained(albef_export / "text")
    ids, mask = model._tokens(CAPTIONS)
    theirs_ids = tokenizer(CAPTIONS, padding=True, truncation=True, max_length=model.max_text_len,
                           return_tensors="pt")["input_ids"]
    assert torch.equal(ids, theirs_ids)
    with torch.no_grad():
        ours = model.recipe.backbone.encode_text(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert hf.config.num_hidden_layers == model.cfg.model.text_layers
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_image_inputs_agree(albef_export):
    """PIL images, uint8 tensors and the already-normalised batch give the same embeddings."""
    from fastvl.data.images import _to_rgb_array

    model = fastvl.load(albef_export)
    images = pictures()
    pixels = [torch.from_numpy(_to_rgb_array(im).copy()).permute(2, 0, 1) for im in images]
    from_pil = model.encode_image(images)
    torch.testing.assert_close(model.encode_image(pixels), from_pil, atol=0, rtol=0)
    torch.testing.assert_close(model.encode_image(model.images_tensor(images)), from_pil, atol=0, rtol=0)
    same_size = torch.stack([pixels[1], pixels[1]])
    torch.testing.assert_close(model.encode_image(same_size), model.encode_image([pixels[1], pixels[1]]), atol=0, rtol=0)
    assert torch.allclose(from_pil.norm(dim=-1), torch.ones(3), atol=1e-5)
    scores = model.itm_score(images, CAPTIONS)
    assert scores.shape == (3,) and bool(((scores >= 0) & (scores <= 1)).all())
    with pytest.raises(ValueError, match="normalised"):
        model.encode_image(torch.zeros(1, 3, 10, 10))
    with pytest.raises(ValueError, match="row by row"):
        model.itm_score(images, CAPTIONS[:2])


def test_readme_example_runs_as_written(albef_export, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(albef_export, tmp_path / "models" / "tiny-albef")
    pictures(1)[0].convert("RGB").save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(), "README example", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "tensor(" in printed
    model = namespace["model"]
    similarity = model.encode_image(namespace["images"]) @ model.encode_text(namespace["texts"]).T
    assert similarity.shape == (1, 2) and bool((similarity.abs() <= 1 + 1e-5).all())


def test_eval_reads_an_export_as_it_reads_the_run(albef_export, albef_run, synth_data, tmp_path):
    heldout = str(synth_data / "heldout")
    for name, checkpoint in (("run", albef_run), ("export", albef_export)):
        assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", heldout,
                         "--out", str(tmp_path / f"{name}.json")]) == 0
    from_run, from_export = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "export"))
    assert from_run["step"] == from_export["step"] == 2
    assert from_run["retrieval"] == from_export["retrieval"] and from_run["probes"] == from_export["probes"]


def test_export_refuses_a_non_empty_folder(albef_run, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert cli.main(["export", str(albef_run), "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return save_run(build_recipe(TINY_ALBEF, seed=3), tmp_path_factory.mktemp("teacher") / "run")


@pytest.mark.parametrize("config", ["configs/tiny_mamo.json", "configs/tiny_maskvlm.json",
                                    "configs/tiny_cmask.json", "configs/tiny_epic.json"])
def test_every_recipe_exports(config, teacher_run, tmp_path, capsys):
    """A built recipe saved as a run exports; the loaded export scores as the recipe's own scorer (EPIC:
    through its base ALBEF). C-Mask's multiway backbone has no BERT text tower: no text/ folder, said so."""
    recipe = build_recipe(config, f"method.options.teacher={teacher_run}" if "epic" in config else "data.max_text_len=32",
                          seed=1)
    run = save_run(recipe, tmp_path / "run", step=5)
    out = tmp_path / "export"
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    exported = fastvl.load(out)
    assert exported.step == 5
    assert_same_outputs(VisionLanguageModel(recipe, recipe.cfg, 5, torch.device("cpu")), exported)
    if "epic" in config:
        assert exported.cfg.method.name == "albef" and "teacher" not in json.dumps(exported.cfg.method.options)
    if "cmask" in config:
        assert not (out / "text").exists() and "no text/ BertModel" in printed
    else:
        assert (out / "text" / "model.safetensors").is_file()


def test_load_names_a_missing_folder():
    with pytest.raises(ConfigError, match="not found"):
        fastvl.load("/nonexistent/model")


def test_a_run_evaluates_without_its_pretrained_files(albef_run, monkeypatch):
    """The run's final weights record the LayerNorm epsilons a pretrained init set, so rebuilding it never
    reads model.text_init again (the folder may be gone) and still gives the init's epsilon."""
    import fastvl.models.albef

    def refuse(*args, **kwargs):
        raise AssertionError("load_recipe read the pretrained text weights again")

    monkeypatch.setattr(fastvl.models.albef, "load_hf_bert", refuse)
    recipe, cfg, _ = load_recipe(str(albef_run))
    assert cfg.model.text_init is not None  # the run's config still says where it started
    norms = [m for m in recipe.backbone.text_encoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == BERT_EPS for m in norms)
