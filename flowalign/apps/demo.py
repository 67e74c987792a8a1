"""``flowalign demo``: align the shipped tiny pipeline to the toy GenEval reward (Centered Reward Distillation,
the recipe ``configs/toy_demo.yaml``), and report.

Writes to ``--out``: ``metrics.json`` (held-out toy_geneval before/after, overall and per task, samples,
wall time), ``reward_curve.png``, ``grid.png`` (base vs aligned on the same seeds), ``report.md``,
``metrics.jsonl`` (per iteration), ``lora/`` (the adapter, loadable with ``pipe.load_lora_weights``) and, as every
training run, ``config.yaml``, ``evals.jsonl`` and the last ``ckpt-<iteration>/`` (``--resume`` continues a killed run).
"""

from __future__ import annotations

import json
import os
import time

import yaml

from .. import lora
from ..config import DEFAULT_MODEL, Config, load_config, parse_overrides, resolve_config_path
from ..callbacks import TrainerCallback
from ..evaluation.hacking import drift_markdown
from ..evaluation.report import plot_reward_curve
from ..resources import shipped_config
from ..trainer import _headline, run_training
from .demo_rlg import RLG_SCALES, heldout_rlg_sweep, mean_pm, plot_rlg_sweep, sweep_markdown

DEMO_CONFIG = shipped_config("toy_demo.yaml")


def demo_config(out_dir: str, seed: int = 0, steps: int | None = None, quick: bool = False,
                model: str = DEFAULT_MODEL, config: str = DEMO_CONFIG, resume: bool = False,
                overrides: list[str] | None = None) -> Config:
    """The demo's recipe is ``configs/toy_demo.yaml`` (Centered Reward Distillation; its fixed budget fits
    15 minutes on a 2-core CPU); ``quick`` shrinks it to a smoke run of about 10 s; ``steps`` overrides the number
    of iterations; ``config`` names another recipe (any algorithm, e.g. configs/toy_grpo.yaml) to run the same report with;
    ``overrides`` are ``section.key=value`` strings as for ``flowalign train`` (the demo's own settings win)."""
    fixed = {"model.path": model, "train.seed": seed, "train.out_dir": out_dir}
    if quick:
        fixed.update({"train.iterations": 2, "train.prompts_per_iter": 2, "train.group_size": 4,
                      "train.eval_per_task": 2, "train.eval_every": 0})
    if steps is not None:
        fixed["train.iterations"] = steps
    if resume:
        fixed["train.resume"] = True
    path = resolve_config_path(config)
    with open(path, encoding="utf-8") as f:
        sections = yaml.safe_load(f) or {}
    if isinstance(sections, dict) and "distill" in sections:
        raise ValueError(f"{config} is an f-distill recipe (it has a distill section): run it with "
                         f"`flowalign distill {config}`; the demo reports a training run")
    cfg = load_config(path, {**(parse_overrides(overrides) if overrides else {}), **fixed})
    if cfg.train.eval_per_task == 0:
        raise ValueError(f"{config}: the demo reports held-out scores, but train.eval_per_task=0 switches the "
                         "evaluation off; drop that override (or use `flowalign train` for a run without evaluation)")
    return cfg


# the base is also reported at these CFG scales (and the aligned model against the best): 2 is the base's best on
# the toy world, 4.5 the SD3 default (docs/results.md); 3 and 7 were dropped to fit the 15-minute demo
BASE_GUIDANCE_SWEEP = (1.0, 2.0, 4.5)


def run_demo(out_dir: str = "demo_out", seed: int = 0, steps: int | None = None, quick: bool = False,
             model: str = DEFAULT_MODEL, config: str = DEMO_CONFIG, resume: bool = False,
             overwrite: bool = False, overrides: list[str] | None = None) -> dict:
    """Run the demo and write the report folder; returns the metrics written to metrics.json.

    The demo is ``run_training`` (checkpoints, ``--resume``, held-out evaluation before and after) observed by
    :class:`DemoReport`. Base and aligned are scored on the same held-out prompts and seeds at the recipe's
    evaluation CFG (``sampling.eval_guidance_scale``); the base is also scored at ``BASE_GUIDANCE_SWEEP`` so the
    report shows the gain over the base at its own best CFG, not only at the recipe's."""
    cfg = demo_config(out_dir, seed, steps, quick, model, config, resume, overrides)
    report = DemoReport(cfg, quick)
    run_training(cfg, callbacks=[report], overwrite=overwrite)
    print(f"wrote {out_dir}/report.md ({report.result['wall_s']:.0f} s)")
    return report.result


class DemoReport(TrainerCallback):
    """Prints the base and aligned held-out scores as they come and, at the end of the run, sweeps the base's
    CFG and writes metrics.json, grid.png, the demo's reward_curve.png and report.md."""

    def __init__(self, cfg: Config, quick: bool):
        self.cfg, self.quick = cfg, quick
        self.t0 = time.time()
        self.result: dict = {}
        self.images: dict = {}  # "base" / "aligned" -> the held-out images [N, 3, H, W]

    def on_evaluate(self, trainer, row: dict) -> None:
        side = "base" if row["weights"] == "base" else "aligned"
        self.images[side] = trainer.last_eval_images  # the final evaluation's stays
        if side == "aligned" and trainer.iteration < self.cfg.train.iterations:
            return  # a periodic evaluation during training
        cfg = f", n={row['n']}, CFG {trainer.heldout.guidance_scale:g}" if side == "base" else ""
        if "toy_geneval" in row:
            s = _toy_scores(row)
            print(f"{side} held-out toy_geneval {s['toy_geneval']:.3f} (strict {s['strict']:.3f}{cfg})")
        else:  # a recipe on the toy world's text prompts: its held-out score is OCR
            key = _headline(row)
            print(f"{side} held-out {key} {row[key]:.3f} ({cfg.lstrip(', ')})")

    def on_train_end(self, trainer, summary: dict) -> None:
        cfg, out_dir = self.cfg, self.cfg.train.out_dir
        name = trainer.algorithm.title
        key = summary["headline"]  # toy_geneval, or ocr for the text recipes
        scores = _toy_scores if key == "toy_geneval" else (lambda row: _plain_scores(row, key))
        base, aligned = scores(summary["base"]), scores(summary["aligned"])
        base_rows = _base_guidance_sweep(trainer, () if self.quick else BASE_GUIDANCE_SWEEP, known=summary["base"])
        base_by_cfg = {g: row[key] for g, row in base_rows.items()}
        best_cfg = max(base_by_cfg, key=lambda g: base_by_cfg[g]) if base_by_cfg else None
        exact_by_cfg = {g: row["toy_geneval_exact"] for g, row in base_rows.items() if "toy_geneval_exact" in row}
        best_exact = max(exact_by_cfg, key=lambda g: exact_by_cfg[g]) if exact_by_cfg else None
        grid_counts = self._write_grid(trainer, key)
        sweep = self._rlg_sweep(trainer, summary) if key == "toy_geneval" else None
        plot_reward_curve(trainer.metrics_log.rows, os.path.join(out_dir, "reward_curve.png"),
                          evals=[(e["iteration"], e[key]) for e in trainer.evals],
                          title=f"{name} on the shipped pipeline: {key}", evals_label=f"held-out {key}")
        self.result = {
            "headline": key, "base": base, "aligned": aligned, "delta": aligned[key] - base[key],
            "delta_exact": (aligned["exact"] - base["exact"]) if "exact" in base and "exact" in aligned else None,
            "eval_guidance_scale": trainer.heldout.guidance_scale,
            "base_by_guidance_scale": {f"{g:g}": v for g, v in base_by_cfg.items()},
            "delta_vs_best_base": (aligned[key] - base_by_cfg[best_cfg]) if best_cfg is not None else None,
            "base_exact_by_guidance_scale": {f"{g:g}": v for g, v in exact_by_cfg.items()},
            "delta_exact_vs_best_base": (aligned["exact"] - exact_by_cfg[best_exact]) if best_exact is not None
            and "exact" in aligned else None,
            "samples": trainer.samples_seen, "iterations": trainer.iteration, "wall_s": time.time() - self.t0,
            "algorithm": cfg.train.algorithm, "model": cfg.model.path, "seed": cfg.train.seed,
            "heldout_images": base["n"],
            "config": {k: {f: (list(v) if isinstance(v, tuple) else v) for f, v in vars(sec).items()}
                       for k, sec in vars(cfg).items()},
        }
        if grid_counts is not None:
            self.result["grid_counts"] = grid_counts  # held-out images fixed / kept / failing / broken (exact)
        if sweep is not None:
            self.result["rlg_sweep"] = sweep  # [{"scale": w, score label: {"mean", "se"}}], the held-out images
        a = summary["aligned"] or {}
        self.result["drift"] = {"flag": bool(a.get("drift")), "flagged": [x for x in a.get("drift_stats", "").split(",")
                                                                        if x],
                                "summary": a.get("drift_summary", ""),
                                "z": {k[len("drift_z/"):]: v for k, v in a.items() if k.startswith("drift_z/")}}
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(self.result, f, indent=2)
        self.result["drift_markdown"] = drift_markdown(summary["base"] or {}, a)
        (_write_report if key == "toy_geneval" else _write_plain_report)(out_dir, self.result, name)

    def _rlg_sweep(self, trainer, summary: dict) -> list[dict]:
        """The held-out scores at each RLG scale of ``demo_rlg.RLG_SCALES`` -> rlg_sweep.png and the rows. The
        run's base and final evaluations stand in for w = 0 and 1 (bit-exact endpoints); ``--quick`` samples them
        too, so its test checks that they agree."""
        known = None if self.quick else {0.0: summary["base"], 1.0: summary["aligned"]}
        rows = heldout_rlg_sweep(trainer, RLG_SCALES, known)
        plot_rlg_sweep(rows, os.path.join(self.cfg.train.out_dir, "rlg_sweep.png"), summary["base"]["n"])
        print("RLG sweep, held-out exact: " + ", ".join(f"{r['exact']['mean']:.3f} at w={r['scale']:g}"
                                                       for r in rows if "exact" in r))
        return rows

    def _write_grid(self, trainer, key: str):
        """grid.png: on toy GenEval prompts, the verdict grid (evaluation.verdict_grid: every image's checks, the
        prompts the adapter fixed first, the broken last) -> its class counts; otherwise the trainer's base-vs-
        aligned eval grid (-> None)."""
        from ..evaluation.verdict_grid import verdict_grid
        from ..toy import GENEVAL_TASKS

        out_dir, ev = self.cfg.train.out_dir, trainer.heldout
        base, aligned = self.images.get("base"), self.images.get("aligned")
        rows = [i for i, t in enumerate(ev.tasks) if t in GENEVAL_TASKS]
        if key != "toy_geneval" or base is None or aligned is None or not rows:
            os.replace(os.path.join(out_dir, "eval_grid.png"), os.path.join(out_dir, "grid.png"))
            return None
        out = verdict_grid(base[rows], aligned[rows], [ev.prompts[i] for i in rows], os.path.join(out_dir, "grid.png"),
                           tasks=[ev.tasks[i] for i in rows], aligned_label=f"aligned (it {trainer.iteration})")
        return out["counts"]


def _plain_scores(row: dict, key: str) -> dict:
    """A held-out row scored by one reward ``key`` (e.g. ocr) -> {key, "n", "per_task": {task: score}}."""
    prefix = f"{key}/"
    return {key: row[key], "n": row["n"],
            "per_task": {k[len(prefix):]: v for k, v in row.items() if k.startswith(prefix)}}


def _write_plain_report(out_dir: str, r: dict, name: str) -> None:
    """report.md for a recipe whose held-out score is one reward (the toy text prompts' OCR)."""
    key = r["headline"]
    rows = "\n".join(f"| {task} | {v:.3f} | {r['aligned']['per_task'].get(task, float('nan')):.3f} |"
                     for task, v in r["base"]["per_task"].items())
    table = f"\n| task | base | aligned |\n|---|---|---|\n{rows}\n" if rows else ""
    text = f"""# flowalign demo: {name} on the shipped toy pipeline

Held-out {key}, {r['heldout_images']} held-out images, same seeds before and after, CFG
{r['eval_guidance_scale']:g}: **{r['base'][key]:.3f} -> {r['aligned'][key]:.3f}**.

Training: {r['iterations']} iterations, {r['samples']} samples, {r['wall_s']:.0f} s wall in all (seed {r['seed']}),
on the reward {training_reward(r['config']['train'])}.
{table}
"""
    _write_markdown(out_dir, text, r.get("drift_markdown", ""))


def _write_markdown(out_dir: str, body: str, drift: str = "") -> None:
    """report.md: ``body``, the drift section, then the pictures and where the metrics and the adapter are (every
    demo report)."""
    footer = drift + ("![reward curve](reward_curve.png)\n\n![base vs aligned, same seeds](grid.png)\n\n"
              f"Per-iteration metrics: `metrics.jsonl`. The adapter: `lora/` "
              f"(`pipe.load_lora_weights(\"{out_dir}/lora\")`).\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(body + footer)


def _toy_scores(row: dict) -> dict:
    """A held-out row of Trainer.evaluate -> {"toy_geneval", "strict", "extra_objects", "n",
    "per_task": {task: {fraction, strict, extra_objects, n}}, "checks": {task: {check kind: pass rate}}}."""
    from ..toy import GENEVAL_TASKS

    per_task = {t: {"fraction": row[f"toy_geneval/{t}"], "strict": row[f"toy_geneval_strict/{t}"],
                    "extra_objects": row[f"toy_extra_objects/{t}"], "n": row["n"] // len(GENEVAL_TASKS)}
                for t in GENEVAL_TASKS if f"toy_geneval/{t}" in row}
    checks = {}  # {task: {check kind: pass rate}}: where the scores are lost
    for key, rate in row.items():
        if key.startswith("toy_check/"):
            _, task, kind = key.split("/")
            checks.setdefault(task, {})[kind] = rate
    for t, scores in per_task.items():
        if f"toy_geneval_exact/{t}" in row:
            scores["exact"] = row[f"toy_geneval_exact/{t}"]
    out = {"toy_geneval": row["toy_geneval"], "strict": row["toy_geneval_strict"],
           "extra_objects": row["toy_extra_objects"], "n": row["n"], "per_task": per_task, "checks": checks}
    if "toy_geneval_exact" in row:
        out["exact"] = row["toy_geneval_exact"]
    # the headline scores with their standard errors over the held-out images (evaluation.heldout: se/<name>)
    out["headline"] = {label: {"mean": row[key], "se": row.get(f"se/{key}")}
                       for label, key in _headline_keys(row)}
    return out


HEADLINE_SCORES = (("exact", "toy_geneval_exact"), ("lenient", "toy_geneval"), ("strict", "toy_geneval_strict"),
                   ("extra objects", "toy_extra_objects"))


def _headline_keys(row: dict) -> list[tuple[str, str]]:
    """(label, held-out key) of the report's headline table: the toy GenEval scores, then every other reward the
    evaluation scored (e.g. the unseen tiny CLIP score of train.eval_rewards)."""
    known = {key for _, key in HEADLINE_SCORES} | {"ocr"}
    others = sorted(k for k, v in row.items() if isinstance(v, float) and f"se/{k}" in row and k not in known)
    return [(label, key) for label, key in HEADLINE_SCORES if key in row] + [(f"{k} (not trained)", k) for k in others]


def headline_table(base: dict, aligned: dict) -> str:
    """Markdown: each headline score base -> aligned with its standard error over the held-out images, and the
    change with the unpaired standard error sqrt(se_b^2 + se_a^2) (conservative: both sides share prompts and
    seeds, which makes the paired error smaller)."""
    rows = []
    for label, b in base.get("headline", {}).items():
        a = aligned.get("headline", {}).get(label)
        if a is None:
            continue
        se = ((b["se"] ** 2 + a["se"] ** 2) ** 0.5) if b.get("se") is not None and a.get("se") is not None else None
        change = f"{a['mean'] - b['mean']:+.3f}" + (f" +- {se:.3f}" if se is not None else "")
        rows.append(f"| {label} | {mean_pm(b)} | {mean_pm(a)} | {change} |")
    return "| held-out score | base | aligned | change |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _base_guidance_sweep(trainer, scales, known: dict | None = None) -> dict:
    """{CFG scale: held-out row of the base} on the demo's held-out prompts and seeds; ``known``: the base's
    held-out row at the evaluation CFG, used for that scale instead of sampling it again."""
    out, ev = {}, trainer.heldout
    keep = ev.guidance_scale
    try:
        with lora.adapter_disabled(trainer.adapter):
            for g in scales:
                if known is not None and g == keep:
                    out[g] = known
                    continue
                ev.guidance_scale = g
                out[g] = ev(trainer.adapter.pipe)[0]
    finally:
        ev.guidance_scale = keep
    return out


def training_reward(train: dict) -> str:
    """The report's words for the training reward of a ``train`` config section, e.g. "`toy_geneval` with
    partial=True (held-out scores use the exact checks)"."""
    options = ", ".join(f"{k}={v}" for k, v in (train["reward_options"] or {}).items())
    return f"`{train['reward']}`" + (f" with {options} (held-out scores use the exact checks)" if options else "")


def _check_kinds(r: dict) -> list[tuple[str, str]]:
    """(task, check kind) of the base or the aligned model, in first-seen order (a conditional kind such as
    "relation, objects drawn" exists only where some image qualified)."""
    seen = {}
    for side in ("base", "aligned"):
        for task, kinds in r[side]["checks"].items():
            seen.update({(task, kind): None for kind in kinds})
    return list(seen)


def _rate(checks: dict, task: str, kind: str) -> str:
    rate = checks.get(task, {}).get(kind)
    return "n/a" if rate is None else f"{rate:.3f}"


def _write_report(out_dir: str, r: dict, name: str) -> None:
    rows = "\n".join(
        f"| {task} | {r['base']['per_task'][task]['fraction']:.3f} | {r['aligned']['per_task'][task]['fraction']:.3f} "
        f"| {r['base']['per_task'][task]['n']} |" for task in r["base"]["per_task"])
    checks = "\n".join(f"| {task} | {kind} | {_rate(r['base']['checks'], task, kind)} | "
                       f"{_rate(r['aligned']['checks'], task, kind)} |" for task, kind in _check_kinds(r))
    exact_at = r.get("base_exact_by_guidance_scale") or {}
    sweep = ", ".join(f"{v:.3f} at CFG {g}" + (f" (exact {exact_at[g]:.3f})" if g in exact_at else "")
                      for g, v in r["base_by_guidance_scale"].items())
    trained_on = training_reward(r["config"]["train"])
    vs_exact = (f", and {r['delta_exact_vs_best_base']:+.3f} over its best exact score"
                if r.get("delta_exact_vs_best_base") is not None else "")
    best = (f"\nThe base at other CFG scales (same prompts and seeds): {sweep}; the aligned model is "
            f"{r['delta_vs_best_base']:+.3f} over the base's best lenient score at any of them{vs_exact}.\n"
            ) if sweep else ""
    exact = (f"Held-out exact score (every constraint of the prompt met and no object it did not ask for: \"a circle\" "
             f"means one circle): **{r['base']['exact']:.3f} -> {r['aligned']['exact']:.3f}**.\n\n"
             if "exact" in r["base"] and "exact" in r["aligned"] else "")
    text = f"""# flowalign demo: {name} on the shipped toy pipeline

{exact}{headline_table(r['base'], r['aligned'])}
{r['heldout_images']} held-out images, the same seeds before and after, CFG {r['eval_guidance_scale']:g}; +- is the
standard error over the images.

Held-out toy_geneval (lenient: the fraction of the prompt's constraints met):
**{r['base']['toy_geneval']:.3f} -> {r['aligned']['toy_geneval']:.3f}** (strict all-met: {r['base']['strict']:.3f} -> {r['aligned']['strict']:.3f}).
Images with more objects than the prompt asks for (GenEval's checks ignore them; a rise is reward hacking):
{r['base']['extra_objects']:.3f} -> {r['aligned']['extra_objects']:.3f}.
{best}
Training: {r['iterations']} iterations, {r['samples']} samples, {r['wall_s']:.0f} s wall in all (seed {r['seed']}),
on the reward {trained_on}.

| task | base | aligned | images |
|---|---|---|---|
{rows}

Where the scores are lost: the share of each kind of check met (a two-object prompt makes two "colour+shape"
checks; "relation" is a position prompt's left/right/above/below; "relation, objects drawn" and "count, object
drawn" count only the images where the named objects are present, so they separate placing and counting from
drawing).

| task | check | base | aligned |
|---|---|---|---|
{checks}
{_sweep_section(r)}
"""
    _write_markdown(out_dir, text, r.get("drift_markdown", ""))


def _sweep_section(r: dict) -> str:
    """report.md's RL guidance section (empty when the demo did not sweep)."""
    if not r.get("rlg_sweep"):
        return ""
    return ("\n## RL guidance: the alignment strength at inference time\n\n"
            "`out = out_ref + w (out_theta - out_ref)` at every denoiser call (`flowalign sample --rlg-scale W`, the "
            "Gradio slider): w = 0 is the base, w = 1 the new adapter, w > 1 extrapolates. The same held-out "
            f"images and seeds:\n\n{sweep_markdown(r['rlg_sweep'])}\n![RL guidance sweep](rlg_sweep.png)\n\n")
