"""Run several `flowalign train` recipes side by side and compare their held-out curves.

    python scripts/sweep_recipes.py scripts/sweeps/toy_demo_recipes.txt --out runs/sweep --parallel 10
    python scripts/sweep_recipes.py --summarise runs/sweep              # table + plot of finished runs only

A runs file holds one run per line, ``name | config.yaml | section.key=value ...`` (``#`` starts a comment).
Each run is ``flowalign train CONFIG train.out_dir=OUT/NAME OVERRIDES`` in its own process (``--threads`` torch
threads each; ``--time-limit`` seconds each, after which the run is stopped and what it evaluated so far is kept).
Runs fill the machine ``--parallel`` at a time: the tiny toy pipeline leaves a GPU mostly idle, so ten runs at once
on one GPU cost about what one does.

Then, from every ``OUT/*/evals.jsonl`` (the held-out evaluations the trainer writes every ``train.eval_every``
iterations): ``OUT/sweep.json`` {name: [{iteration, toy_geneval, strict, extras}, ...]}, a Markdown table on stdout
(base, best, last), and ``OUT/sweep.png``, held-out toy_geneval vs iteration, one line per run.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from tqdm import tqdm


def parse_runs(path: str) -> list[tuple[str, str, list[str]]]:
    """Runs file -> [(name, config, overrides)]; a malformed line raises ValueError naming it."""
    runs, seen = [], set()
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = [p.strip() for p in line.split("|")]
            if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
                raise ValueError(f"{path}:{n}: expected 'name | config.yaml | key=value ...', got {line!r}")
            name, config = parts[0], parts[1]
            if name in seen or "/" in name:
                raise ValueError(f"{path}:{n}: run names must be unique folder names, got {name!r}")
            seen.add(name)
            runs.append((name, config, shlex.split(parts[2]) if len(parts) == 3 else []))
    if not runs:
        raise ValueError(f"{path} lists no runs: add lines 'name | config.yaml | key=value ...'")
    return runs


def run_one(name: str, config: str, overrides: list[str], out: str, threads: int, limit: float | None) -> int:
    """One `flowalign train` process, its output in OUT/NAME.log. Returns its exit code (-9 = stopped at the limit)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "flowalign.cli", "train", config, f"train.out_dir={os.path.join(out, name)}", *overrides]
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            return proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9


def summarise(out: str) -> dict[str, list[dict]]:
    """{run: [{iteration, toy_geneval, strict, extras}]} from OUT/*/evals.jsonl (runs without one are skipped)."""
    curves = {}
    for path in sorted(glob.glob(os.path.join(out, "*", "evals.jsonl"))):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        curves[os.path.basename(os.path.dirname(path))] = [
            {"iteration": r["iteration"], "toy_geneval": r["toy_geneval"], "strict": r.get("toy_geneval_strict"),
             "extras": r.get("toy_extra_objects")} for r in rows if "toy_geneval" in r]
    return curves


def table(curves: dict[str, list[dict]]) -> str:
    """Markdown: per run the base, the best held-out score (and its iteration) and the last one."""
    lines = ["| run | base | best (iteration) | last (iteration) | extras at last |", "|---|---|---|---|---|"]
    for name, rows in curves.items():
        if not rows:
            continue
        best = max(rows[1:] or rows, key=lambda r: r["toy_geneval"])
        last = rows[-1]
        extras = "" if last["extras"] is None else f"{last['extras']:.3f}"
        lines.append(f"| {name} | {rows[0]['toy_geneval']:.3f} | {best['toy_geneval']:.3f} ({best['iteration']}) | "
                     f"{last['toy_geneval']:.3f} ({last['iteration']}) | {extras} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: str, target_gain: float | None = None) -> None:
    """Held-out toy_geneval vs iteration, one line per run (20 colours, then a new line style); with
    ``target_gain`` a dashed line at the first run's base score + target_gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (name, rows) in enumerate(curves.items()):
        ax.plot([r["iteration"] for r in rows], [r["toy_geneval"] for r in rows], marker="o", ms=3, label=name,
                color=plt.cm.tab20(i % 20), linestyle=("-", "--", ":")[i // 20 % 3])
    first = next((rows for rows in curves.values() if rows), None)
    if target_gain is not None and first:
        ax.axhline(first[0]["toy_geneval"] + target_gain, color="k", linestyle="--", linewidth=1,
                   label=f"base + {target_gain:g}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("held-out toy_geneval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="?", help="runs file: 'name | config.yaml | key=value ...' per line")
    ap.add_argument("--out", default="runs/sweep", help="parent folder of the runs' out_dirs")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds per run before it is stopped")
    ap.add_argument("--summarise", metavar="DIR", help="only summarise the finished runs under DIR")
    ap.add_argument("--target-gain", type=float, default=None, help="draw a line at base + this gain")
    args = ap.parse_args(argv)
    out = args.summarise or args.out
    if not args.summarise:
        if not args.runs:
            ap.error("give a runs file, or --summarise DIR")
        try:
            runs = parse_runs(args.runs)
        except (OSError, ValueError) as e:
            print(f"sweep_recipes: error: {e}", file=sys.stderr)
            return 2
        os.makedirs(out, exist_ok=True)
        start = time.time()
        with ThreadPoolExecutor(max(1, args.parallel)) as pool, tqdm(total=len(runs), desc="runs") as bar:
            futures = {pool.submit(run_one, n, c, o, out, args.threads, args.time_limit): n for n, c, o in runs}
            for fut in as_completed(futures):
                code = fut.result()
                bar.update(1)
                if code not in (0, -9):
                    tqdm.write(f"{futures[fut]}: exit {code}, see {os.path.join(out, futures[fut] + '.log')}")
        print(f"{len(runs)} runs in {time.time() - start:.0f}s")
    curves = summarise(out)
    if not curves:
        print(f"sweep_recipes: error: no {out}/*/evals.jsonl: set train.eval_every in the runs", file=sys.stderr)
        return 2
    with open(os.path.join(out, "sweep.json"), "w") as f:
        json.dump(curves, f, indent=1)
    plot(curves, os.path.join(out, "sweep.png"), args.target_gain)
    print(table(curves))
    print(f"wrote {os.path.join(out, 'sweep.json')}, {os.path.join(out, 'sweep.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
