"""The web app without a browser: adapter discovery in run folders, the toy reward's verdict line, the training
curves of a run's metrics.jsonl / evals.jsonl (also while the run is writing them), the one-line messages for bad
input, and the app switching between two adapters of one run (``flowalign.apps.gradio_app``, ``.run_plots``)."""

import json
import os

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio", reason='gradio not installed: pip install -e ".[dev]"')

from flowalign.apps.gradio_app import (NO_VERDICT, RLGApp, adapter_sources, find_adapters, run_folder,  # noqa: E402
                                       verdict_text)
from flowalign.apps.run_plots import curves_png, read_run  # noqa: E402
from flowalign.apps.sample import LORA_FILE  # noqa: E402
from flowalign.cli import main  # noqa: E402


def _adapter(folder):
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, LORA_FILE), "wb").close()  # discovery looks for the file only
    return str(folder)


def _run(root, name, ckpts=(2, 10)):
    run = root / name
    _adapter(run / "lora")
    for it in ckpts:
        _adapter(run / f"ckpt-{it}" / "lora")
    return str(run)


def test_adapters_of_runs_lora_first_then_checkpoints_newest_first(tmp_path):
    run = _run(tmp_path / "a", "run")
    os.makedirs(os.path.join(run, "ckpt-4"))  # a checkpoint without lora/: not an adapter
    _adapter(os.path.join(run, "ckpt-12.tmp", "lora"))  # a checkpoint being written: never offered
    found = find_adapters([run])
    assert list(found) == ["run/lora", "run/ckpt-10", "run/ckpt-2"]
    assert found["run/ckpt-10"] == os.path.join(run, "ckpt-10", "lora")
    assert run_folder(found["run/ckpt-10"]) == run_folder(found["run/lora"]) == run
    # a folder of runs (bench's) is searched one level down; two runs of one name stay apart
    _run(tmp_path / "bench", "grpo", ckpts=()), _run(tmp_path / "bench", "run", ckpts=())
    labels = list(find_adapters([run, str(tmp_path / "bench")]))
    assert labels[:4] == ["run/lora", "run/ckpt-10", "run/ckpt-2", "grpo/lora"]
    assert labels[4] == f"run/lora ({tmp_path / 'bench' / 'run' / 'lora'})"
    # --lora first, not offered twice when a run holds it too
    assert list(adapter_sources(os.path.join(run, "lora"), [run])) == ["run/lora", "run/ckpt-10", "run/ckpt-2"]
    assert list(adapter_sources(os.path.join(run, "ckpt-2", "lora"))) == ["run/ckpt-2"]


def test_a_folder_without_adapter_is_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter in .*train one with `flowalign train RECIPE`"):
        find_adapters([str(empty)])
    with pytest.raises(FileNotFoundError, match="not found: pass --runs DIR"):
        find_adapters([str(tmp_path / "nope")])
    for bad in (empty, tmp_path / "nope"):
        assert main(["gradio", "--runs", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flowalign: error: ") and "\n" not in err and str(bad) in err


def test_cli_passes_the_runs(tmp_path, monkeypatch):
    import flowalign.apps.gradio_app as app

    calls = []
    monkeypatch.setattr(app, "launch", lambda **kw: calls.append(kw))
    assert main(["gradio", "--runs", "a", "b"]) == 0
    assert main(["gradio", "--runs", "a", "--lora", "l"]) == 0
    assert main(["gradio"]) == 0
    assert [(kw["lora_dir"], list(kw["runs"])) for kw in calls] == [(None, ["a", "b"]), ("l", ["a"]),
                                                                    ("demo_out/lora", [])]


def _rendered(prompt, seed=0):
    from flowalign.toy import parse_prompt, render

    im = render(parse_prompt(prompt), size=64, seed=seed)[0]
    return torch.from_numpy(np.asarray(im, dtype="float32") / 255).permute(2, 0, 1)


def test_verdict_line():
    circle = _rendered("a red circle")
    assert verdict_text(circle, "a red circle") == \
        "exact 1 | lenient 1.00 | + present(circle), + present(red circle), + no extra objects"
    two = verdict_text(_rendered("two blue squares"), "a blue square")  # one square too many
    assert two.startswith("exact 0 | lenient 1.00 | ") and "- no extra objects (2 > 1)" in two
    assert verdict_text(circle, "a blue square").startswith("exact 0 | lenient 0.00 | - present(square)")
    for prompt in ("a cat on a sofa", 'the text "AB"', ""):  # outside the grammar; text prompts are OCR's
        assert verdict_text(circle, prompt) == NO_VERDICT


def _write_jsonl(path, rows, tail=""):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)


def test_curves_of_a_run_still_writing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _write_jsonl(run / "metrics.jsonl", [{"iteration": 1, "reward_mean": 0.25, "loss": 0.1},
                                         {"iteration": 2, "reward_mean": None, "loss": 0.2},
                                         {"iteration": 3, "reward_mean": 0.75, "loss": 0.3}],
                 tail='{"iteration": 4, "rew')  # the line the trainer is writing now
    _write_jsonl(run / "evals.jsonl", [{"iteration": 0, "weights": "base", "toy_geneval": 0.5, "toy_geneval_exact":
                                        0.25, "se/toy_geneval": 0.1, "n": 12},
                                       {"iteration": 3, "toy_geneval": 0.75, "toy_geneval_exact": 0.5, "n": 12}])
    curves = read_run(str(run))
    assert curves.key == "reward_mean" and curves.train == [(1, 0.25), (3, 0.75)] and curves.skipped == 1
    assert curves.heldout == {"toy_geneval": [(0, 0.5), (3, 0.75)], "toy_geneval_exact": [(0, 0.25), (3, 0.5)]}
    path, message = curves_png(str(run), str(tmp_path / "curves.png"))
    assert path == str(tmp_path / "curves.png") and os.path.getsize(path) > 1000
    from PIL import Image

    assert Image.open(path).format == "PNG"
    assert message == (f"{run}: 2 iterations (reward_mean, last iteration 3), 2 held-out evaluations (toy_geneval, "
                       "toy_geneval_exact); 1 line(s) not yet complete, skipped")
    _write_jsonl(run / "metrics.jsonl", [{"iteration": 1, "loss": 0.5}])  # no reward logged (e.g. OPD): the loss
    os.remove(run / "evals.jsonl")
    assert read_run(str(run)).key == "loss" and read_run(str(run)).heldout == {}
    assert curves_png(str(run), str(tmp_path / "loss.png"))[0] is not None


def test_curves_messages_instead_of_errors(tmp_path):
    out = str(tmp_path / "c.png")
    (tmp_path / "plain").mkdir()
    (tmp_path / "starting").mkdir()
    _write_jsonl(tmp_path / "starting" / "metrics.jsonl", [], tail='{"iterat')
    cases = {"": "enter a run folder", str(tmp_path / "nope"): "not found: enter the train.out_dir",
             str(tmp_path / "plain"): "no metrics.jsonl or evals.jsonl in",
             str(tmp_path / "starting"): "no complete rows yet"}
    for run_dir, expect in cases.items():
        path, message = curves_png(run_dir, out)
        assert path is None and expect in message and "\n" not in message
    assert not os.path.exists(out)


def test_app_switches_between_the_adapters_of_a_run(two_adapter_run, tmp_path):
    model, run = two_adapter_run
    app = RLGApp(model, runs=[run], nrg_rewards={})
    assert app.adapter_labels == ["run/lora", "run/ckpt-3"] and app.adapter == "run/lora" and app.run_dir == run
    first = app.generate("a red circle", 0, 2, 4.5, 1.0)
    second = app.generate("a red circle", 0, 2, 4.5, 1.0, adapter="run/ckpt-3")
    assert np.array_equal(np.asarray(first[0]), np.asarray(second[0])), "the base image depends on the adapter"
    assert not np.array_equal(np.asarray(first[1]), np.asarray(second[1])), "both adapters drew the same image"
    assert first[1].size == (256, 256) and "adapter run/ckpt-3 |" in second[4]
    assert all(v.startswith("exact ") for v in first[2:4] + second[2:4])
    again = app.generate("a red circle", 0, 2, 4.5, 1.0, adapter="run/lora")  # cached: loaded once
    assert np.array_equal(np.asarray(first[1]), np.asarray(again[1])) and len(app._loaded) == 2
    assert app.generate("a cat", 0, 2, 4.5, 1.0)[2] == NO_VERDICT
    assert app.select_adapter("run/ckpt-3") == f"adapter run/ckpt-3: {run}/ckpt-3/lora"
    with pytest.raises(gr.Error) as err:
        app.select_adapter("x")
    assert err.value.message.startswith("no adapter 'x': pick one from the list")
    os.makedirs(f"{run}/ckpt-5/lora")  # written since the app started, and damaged
    with open(f"{run}/ckpt-5/lora/{LORA_FILE}", "wb") as f:
        f.write(b"not safetensors")
    assert app.rescan().choices == [("run/lora", "run/lora"), ("run/ckpt-5", "run/ckpt-5"),
                                    ("run/ckpt-3", "run/ckpt-3")]
    with pytest.raises(gr.Error) as err:
        app.select_adapter("run/ckpt-5")
    assert "could not be loaded" in err.value.message and "\n" not in err.value.message
    assert np.array_equal(np.asarray(app.generate("a red circle", 0, 2, 4.5, 1.0, adapter="run/lora")[1]),
                          np.asarray(first[1])), "a failed load broke the app"
    image, message = app.curves(run)  # no logs in this run
    assert image is None and "no metrics.jsonl" in message
