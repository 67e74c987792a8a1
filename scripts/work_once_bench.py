"""Issue 25's "work once, not per call", measured on the shipped pipeline: the toy GRPO recipe's iterations with the
CFG embeddings concatenated once per batch and the sampling grid built once (as shipped) against the same
iterations with both undone (a fresh concatenation at every denoiser call, a fresh scheduler copy at every grid),
alternating in one process so the machine's drift hits both; and the removed work itself, timed call by call.

    python scripts/work_once_bench.py --rounds 3 --iterations 2 [--out work_once.json]

Prints and writes {"once": s/iter, "every_call": s/iter, "removed_s_per_iter": ..., "removed_share": ...}; the
trained weights of the two paths are equal (tests/test_train_cli.py checks it bit for bit).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flowalign.config import load_config
from flowalign.models import base
from flowalign.resources import shipped_config
from flowalign.trainer import Trainer


class Undone:
    """Within the context: Conditioning.cfg_pair and FlowAdapter.sampling_grid do their work at every call, and the
    seconds that work takes are summed in ``seconds``."""

    def __init__(self):
        self.seconds = 0.0
        self.saved = (base.Conditioning.cfg_pair, base.FlowAdapter.sampling_grid)

    def _timed(self, fn):
        def call(*args):
            t0 = time.perf_counter()
            out = fn(*args)
            self.seconds += time.perf_counter() - t0
            return out
        return call

    def __enter__(self):
        build = base.FlowAdapter._build_grid
        base.Conditioning.cfg_pair = self._timed(
            lambda c: {k: torch.cat([c.uncond[k], c.cond[k]]) for k in c.cond})
        base.FlowAdapter.sampling_grid = self._timed(
            lambda a, n, x: build(a, n, x, a._shift_mu(x), a._grid_sigmas(n)))
        return self

    def __exit__(self, *exc):
        base.Conditioning.cfg_pair, base.FlowAdapter.sampling_grid = self.saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="pairs of (shipped, undone) blocks")
    p.add_argument("--iterations", type=int, default=2, help="iterations per block")
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args()
    cfg = load_config(shipped_config("toy_grpo.yaml"), ["train.eval_per_task=0", "train.out_dir=/tmp/work_once"])
    trainer = Trainer(cfg)
    trainer.step()  # warm-up
    times = {"once": [], "every_call": []}
    removed = 0.0
    for _ in range(a.rounds):
        for mode in ("once", "every_call"):
            undone = Undone() if mode == "every_call" else None
            for _ in range(a.iterations):
                if undone is not None:
                    with undone:
                        m = trainer.step()
                else:
                    m = trainer.step()
                times[mode].append(m["time_rollout"] + m["time_reward"] + m["time_update"])
            removed += undone.seconds if undone is not None else 0.0
    n = a.rounds * a.iterations
    result = {mode: sum(v) / len(v) for mode, v in times.items()}
    result["removed_s_per_iter"] = removed / n
    result["removed_share"] = result["removed_s_per_iter"] / result["every_call"]
    result["iterations_each"] = n
    result["torch_threads"] = torch.get_num_threads()
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
