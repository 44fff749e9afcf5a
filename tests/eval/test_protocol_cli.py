"""``fastvl eval`` with the retrieval protocol's settings on the tiny run: every sample by default, a cap
that is printed, and an ALBEF-style annotation file (several captions per image) read directly."""
import json

import pytest

from fastvl import cli
from fastvl.data.shards import ShardSource


def test_a_cap_is_printed_and_no_cap_evaluates_everything(tiny_run, synth_data, tmp_path, capsys):
    heldout = str(synth_data / "heldout")
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", heldout, "--out", str(tmp_path / "a.json"),
                     "--set", "eval.max_samples=10", "eval.itm_rerank=0"]) == 0
    assert "evaluating 10 of 48 images (eval.max_samples" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["retrieval"]["n_images"] == 10
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", heldout, "--out", str(tmp_path / "b.json"),
                     "--set", "eval.max_samples=0", "eval.itm_rerank=0"]) == 0
    assert "evaluating" not in capsys.readouterr().out
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["retrieval"]["n_images"] == 48 and result["data_samples"] == 48


def test_eval_reads_an_albef_annotation_file_with_several_captions_per_image(tiny_run, synth_data, tmp_path, capsys):
    """Six held-out images saved as files under a dataset folder, each with its caption and a
    variant of it, in a JSON array whose image paths are relative to that folder."""
    source = ShardSource(synth_data / "heldout")
    (tmp_path / "images" / "test").mkdir(parents=True)
    records = []
    for i in range(6):
        raw = source.read(i)
        (tmp_path / "images" / "test" / f"{i}.jpg").write_bytes(raw.image)
        records.append({"image": f"test/{i}.jpg", "caption": [raw.caption, f"a picture: {raw.caption}"]})
    annotation = tmp_path / "test.json"
    annotation.write_text(json.dumps(records))
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", str(annotation),
                     "--out", str(tmp_path / "r.json"), "--set", f"data.image_root={tmp_path / 'images'}"]) == 0
    out = capsys.readouterr().out
    assert "retrieval: 6 images, 12 captions" in out
    retrieval = json.loads((tmp_path / "r.json").read_text())["retrieval"]
    assert retrieval["n_images"] == 6 and retrieval["n_captions"] == 12
    for block in ("itc", "itm_rerank"):
        for direction in ("image_to_text", "text_to_image"):
            r = retrieval[block][direction]
            assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0
        assert retrieval[block]["text_to_image"]["R@10"] == 1.0  # 6 images: every caption's image is in the top 10


def test_protocol_settings_are_checked():
    from fastvl.config import ConfigError, load_config

    assert load_config(None).eval.max_samples == 0 and load_config(None).eval.resize == "square"
    with pytest.raises(ConfigError, match="eval.resize must be one of square, center_crop"):
        load_config(None, ["eval.resize=stretch"])
    with pytest.raises(ConfigError, match="eval.max_samples must be >= 0"):
        load_config(None, ["eval.max_samples=-1"])
