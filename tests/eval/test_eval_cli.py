"""``fastvl eval`` on a real (4-step) tiny ALBEF run: reads the consolidated weights and the DeepSpeed
step folders without an engine, writes the JSON, prints the table; bad input exits 2."""
import json

from fastvl import cli
from fastvl.eval.__main__ import run


def _check_sane(result):
    for block in ("itc", "itm_rerank"):
        for direction in ("image_to_text", "text_to_image"):
            r = result["retrieval"][block][direction]
            assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0
    assert set(result["probes"]) == {"relation_swap", "attribute_swap", "shuffle"}
    for p in result["probes"].values():
        assert p["n"] > 0 and 0.0 <= p["itm_accuracy"] <= 1.0 and 0.0 <= p["itc_accuracy"] <= 1.0


def test_eval_command_on_a_run_directory(tiny_run, synth_data, capsys):
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", str(synth_data / "heldout")]) == 0
    out = capsys.readouterr().out
    assert "image->text" in out and "relation_swap" in out and f"results: {tiny_run / 'eval_heldout.json'}" in out
    result = json.loads((tiny_run / "eval_heldout.json").read_text())
    assert result["step"] == 4 and result["method"] == "albef"
    assert result["retrieval"]["n_images"] == 48
    _check_sane(result)


def test_step_folder_and_consolidated_weights_agree(tiny_run, synth_data, tmp_path):
    """The fp32 ZeRO-0 step folder holds the same weights as model.safetensors: identical metrics."""
    consolidated = run(str(tiny_run / "model.safetensors"), str(synth_data / "heldout"), out=str(tmp_path / "a.json"))
    folder = run(str(tiny_run / "step_4"), str(synth_data / "heldout"), out=str(tmp_path / "b.json"))
    assert consolidated["retrieval"] == folder["retrieval"] and consolidated["probes"] == folder["probes"]
    older = run(str(tiny_run / "step_2"), str(synth_data / "heldout"), overrides=["eval.itm_rerank=0"],
                out=str(tmp_path / "c.json"))
    assert older["step"] == 2 and "itm_rerank" not in older["retrieval"]


def test_eval_bad_input_exits_2(tiny_run, synth_data, tmp_path, capsys):
    heldout = str(synth_data / "heldout")
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "nothing"), "--data", heldout]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", str(tmp_path / "nope")]) == 2
    assert "--data: path not found" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tiny_run), "--data", heldout, "--set", "model.preset=base"]) == 2
    assert "only data.* and eval.* can change" in capsys.readouterr().err
