"""`flowalign eval --best-of N` (InfAlign, arXiv 2412.19792): the best-of-N win rate of each LoRA against the
base, on common random numbers (every model's sample (p, k) starts from the same seed)."""

import json

import pytest
import torch

from flowalign.algorithms.calibration import best_of_n_win_rate
from flowalign.cli import main
from flowalign.evaluation.best_of_n import best_of_n_scores, summarize
from flowalign.evaluation.heldout import EVAL_SEED, heldout_rows
from flowalign.models import load_for_inference
from flowalign.rewards import get as get_reward


def test_summarize_of_the_base_against_itself_is_a_tie():
    base = torch.tensor([[0.1, 0.7], [float("nan"), 0.2], [0.3, 0.3]], dtype=torch.float64)
    s = summarize(base, base)
    assert s["win_rate"] == 0.5 and s["win_rate_se"] == 0.0 and (s["prompts"], s["n"]) == (3, 2)
    assert s["best_of_n_mean"] == pytest.approx((0.7 + 0.2 + 0.3) / 3)
    assert s["mean"] == pytest.approx((0.1 + 0.7 + 0.2 + 0.3 + 0.3) / 5)  # the NaN left out


def test_best_of_n_cli_matches_the_scores_sampled_by_hand(tmp_path, tiny_model, capsys):
    # the table's win rate is best_of_n_win_rate of the [P, N] matrices sampled with seeds EVAL_SEED + p N + k
    model, lora_dir = tiny_model
    out = tmp_path / "bon.json"
    rc = main(["eval", lora_dir, "--model", model, "--prompts", "toy:counting,colors", "--per-task", "2",
               "--steps", "2", "--best-of", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["settings"]["best_of"] == 3 and result["settings"]["reward"] == "toy_geneval"
    base, tuned = result["scores"]["base"], result["scores"][lora_dir]
    assert base["win_rate"] == 0.5 and base["win_rate_se"] == 0.0 and base["prompts"] == 4 and base["n"] == 3

    from flowalign.lora import load_lora_weights

    prompts = [p for p, _ in heldout_rows("toy:counting,colors", 2)]
    reward = get_reward("toy_geneval")
    b = best_of_n_scores(load_for_inference(model), prompts, 3, reward, EVAL_SEED, steps=2)
    pipe = load_for_inference(model)
    load_lora_weights(pipe, lora_dir)
    a = best_of_n_scores(pipe, prompts, 3, reward, EVAL_SEED, steps=2)
    rate, se = best_of_n_win_rate(a, b)
    assert tuned["win_rate"] == pytest.approx(rate) and tuned["win_rate_se"] == pytest.approx(se)
    assert tuned["mean"] == pytest.approx(float(a.mean()))
    printed = capsys.readouterr().out
    assert "best-of-3 win rate vs base" in printed and f"| {lora_dir} | 4 |" in printed


def test_best_of_n_scores_use_one_seed_per_sample(tiny_model):
    # sample (p, k) is seed + p N + k: two prompts x 2 samples equal four single-sample draws at those seeds
    model, _ = tiny_model
    pipe = load_for_inference(model)
    reward = get_reward("jpeg_compressibility")
    grid = best_of_n_scores(pipe, ["a red circle", "a blue square"], 2, reward, seed=7, steps=2)
    single = [best_of_n_scores(pipe, [p], 1, reward, seed=7 + i, steps=2)[0, 0]
              for i, p in enumerate(["a red circle"] * 2 + ["a blue square"] * 2)]
    torch.testing.assert_close(grid.flatten(), torch.stack(single))


@pytest.mark.parametrize("args,needle", [
    (["--best-of", "0"], "--best-of must be >= 1"),
    (["--best-of", "2", "--prompts", "PROMPTS"], "pass --reward NAME to pick the best of N"),
])
def test_best_of_n_bad_input_is_one_line(tmp_path, tiny_model, capsys, args, needle):
    model, _ = tiny_model
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    args = [str(prompts) if a == "PROMPTS" else a for a in args]
    assert main(["eval", "--model", model, "--steps", "1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
