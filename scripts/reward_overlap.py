"""How much of a slow reward's time the trainer hides by scoring finished rollout chunks while the next chunk
samples (``train.overlap_rewards``), on the shipped pipeline; and that the weights equal the sequential path's.

    python scripts/reward_overlap.py --pause 0.5 --chunks 8 --iterations 2

The reward sleeps ``--pause`` seconds per call (one call per chunk) and then returns the toy GenEval score. Prints a
markdown row per path: iteration time, scoring time, hidden scoring time and its share; the share can reach
(chunks - 1) / chunks (the last chunk's scoring has no rollout after it to hide behind).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import flowalign
from flowalign.runtime.quiet import quiet_third_party
from flowalign.rewards import Reward, get


class SleepyReward(Reward):
    name = "sleepy_toy_geneval"

    def __init__(self, pause: float):
        self.pause, self.inner = pause, get("toy_geneval")

    def score(self, images, prompts, metadata=None):
        time.sleep(self.pause)
        return self.inner(images, prompts)


def run(overlap: bool, args) -> tuple[list[dict], list[torch.Tensor]]:
    cfg = flowalign.load_config("toy_grpo.yaml", {
        "train.out_dir": f"{args.out}/{'overlap' if overlap else 'sequential'}", "train.eval_every": 0,
        "train.prompts_per_iter": args.prompts, "train.reward_chunks": args.chunks, "train.overlap_rewards": overlap})
    torch.manual_seed(0)
    trainer = flowalign.Trainer(cfg, reward=SleepyReward(args.pause))
    rows = []
    for _ in range(args.iterations):
        t = time.perf_counter()
        m = trainer.step()
        m["time_iter"] = time.perf_counter() - t
        rows.append(m)
    return rows, [p.detach().clone() for p in trainer.params]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pause", type=float, default=0.5)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="train.prompts_per_iter (groups per batch)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", default="runs/reward_overlap")
    args = parser.parse_args()
    quiet_third_party()
    results = {overlap: run(overlap, args) for overlap in (False, True)}
    same = all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}, {torch.get_num_threads()} threads; pause {args.pause} s per call, {args.chunks} chunks, "
          f"{args.prompts} groups per batch; weights equal: {same}")
    print("| path | iteration s | scoring s | hidden s | hidden share |\n|---|---|---|---|---|")
    for overlap, (rows, _) in results.items():
        n = len(rows)
        it, sc, hid = (sum(r[k] for r in rows) / n for k in ("time_iter", "time_reward_scoring", "time_reward_hidden"))
        print(f"| {'overlap' if overlap else 'sequential'} | {it:.2f} | {sc:.2f} | {hid:.2f} | {hid / sc:.0%} |")


if __name__ == "__main__":
    main()
