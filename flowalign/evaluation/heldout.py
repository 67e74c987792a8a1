"""Held-out evaluation during training: a fixed prompt set, fixed seeds, scored by verifiable rewards.

The prompt set comes from ``train.eval_prompts`` (a toy spec or a text file) or, by default, from the training
prompts: a toy spec ('toy', 'toy:text', 'toy:counting,colors'; for OPD each teacher's) gives ``eval_per_task``
held-out prompts per task (the toy world's held-out split, never trained on). A plain prompt file has no
held-out split, so it is only evaluated when ``train.eval_prompts`` names one. A JSONL file of (prompt, image)
rows (editing families) is sampled with each row's condition image (``pipe(image=..., prompt=...)``) and its
rewards get ``metadata[i]["condition_image"]``.

Scores (one dict per evaluation, keys ``<reward>``, ``<reward>/<task>`` and ``se/<reward>``, the standard error
of ``<reward>`` over the images, std / sqrt(n)):
  * toy GenEval prompts -> ``toy_geneval`` (fraction of constraints met), ``toy_geneval_strict`` (1 iff all are
    met), ``toy_geneval_exact`` (strict and no object the prompt did not ask for: "a circle" means one circle),
    ``toy_extra_objects`` (share of images with more objects than asked: GenEval's checks do not see them,
    so a rising share is reward hacking) and ``toy_check/<task>/<kind>`` (pass rate of each kind of check:
    shape, colour+shape, count, relation; and "count, object drawn" / "relation, objects drawn", the count
    or relation over the images that drew the named objects: see ``toy.check_rates``);
  * toy text prompts    -> ``ocr`` (needs rapidocr);
  * other prompts       -> the training reward(s);
  * every prompt        -> each of ``train.eval_rewards`` (e.g. clip_score: a reward the run did not train on,
    to see reward hacking).
Image i is sampled with ``torch.Generator().manual_seed(seed + i)`` at ``sampling.eval_num_steps`` and
``sampling.eval_guidance_scale`` (default: ``sampling.guidance_scale``), so before/after rows match.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch

from .sampling import sample_images
from ..prompts import is_image_rows, read_image_rows, toy_tasks

EVAL_SEED = 10_000  # far from the training seeds


def heldout_rows(spec: str, per_task: int) -> list[tuple[str, str]]:
    """(prompt, task) rows of the held-out set of ``spec``: ``per_task`` per toy task (held-out split, cycled),
    or every line of a prompt file (task ``"file"``)."""
    from ..toy import prompts_in_split

    tasks = toy_tasks(spec)
    if tasks is None and is_image_rows(spec):
        return [(r.prompt, "file") for r in read_image_rows(spec)]
    if tasks is None:
        from ..prompts import read_prompt_file

        return [(p, "file") for p in read_prompt_file(spec, "held-out prompt file", "set train.eval_prompts to a "
                                                      "text file (one prompt per line) or a toy spec such as 'toy'")]
    rows = []
    for task in tasks:
        pool = prompts_in_split(task, "heldout")
        rows += [(pool[i % len(pool)], task) for i in range(per_task)]
    return rows


class HeldoutEval:
    """Callable ``(pipe) -> (scores dict, images [N,3,H,W])`` on a fixed held-out set; see the module doc.

    ``sources``: prompt specs (one per task of the run); ``train_rewards``: {source spec: Reward or None}, used
    for prompts that are not toy prompts; ``extra``: reward names scored on every prompt.
    """

    def __init__(self, sources: Sequence[str], per_task: int, steps: int, guidance_scale: float,
                 train_rewards: Optional[dict] = None, extra: Sequence[str] = (), seed: int = EVAL_SEED,
                 batch_size: int = 32, resolution: Optional[int] = None, reward_options: Optional[dict] = None):
        self.rows, self.source_of, self.image_rows = [], {}, []
        for spec in dict.fromkeys(sources):
            rows = heldout_rows(spec, per_task)
            self.rows += rows
            with_images = toy_tasks(spec) is None and is_image_rows(spec)
            self.image_rows += read_image_rows(spec) if with_images else [None] * len(rows)
            for _, task in rows:
                self.source_of.setdefault(task, spec)
        self.prompts = [p for p, _ in self.rows]
        self.tasks = [t for _, t in self.rows]
        self.steps, self.guidance_scale, self.seed, self.batch_size = steps, guidance_scale, seed, batch_size
        self.resolution = resolution  # sampled at (None: the pipeline's default / the condition image's size)
        self.train_rewards = train_rewards or {}
        self.extra = tuple(extra)
        self.reward_options = dict(reward_options or {})  # {extra reward name: its keyword options}
        self._cache = {}
        self._images: dict = {}  # condition image path -> [3, H, W]

    def _reward(self, name: str):
        from ..rewards import get as get_reward

        if name not in self._cache:
            self._cache[name] = get_reward(name, **self.reward_options.get(name, {}))
        return self._cache[name]

    def use_reward(self, name: str, reward) -> None:
        """Score ``name`` with this Reward instead of ``rewards.get(name)`` (e.g. clip_score on a local CLIP)."""
        self._cache[name] = reward

    @torch.no_grad()
    def __call__(self, pipe, adapter=None) -> tuple[dict, torch.Tensor]:
        """Sample the held-out rows with ``pipe`` (as ``adapter`` samples when given: see ``sample_images``) and
        score them -> (scores, images [N, 3, H, W])."""
        conditions = self._conditions()
        images = sample_images(pipe, self.prompts, self.seed, self.steps, self.guidance_scale, self.batch_size,
                               desc="held-out eval", images=conditions, adapter=adapter, resolution=self.resolution)
        return self.score(images), images

    def _conditions(self) -> Optional[list]:
        """The rows' condition images [3, H, W] (None for a text-only set; a mixed set is refused)."""
        if all(r is None for r in self.image_rows):
            return None
        if any(r is None for r in self.image_rows):
            raise ValueError("a held-out set mixes text prompts and (prompt, image) rows: evaluate one kind")
        return [self._load(r) for r in self.image_rows]

    def _load(self, row) -> torch.Tensor:
        """A row's condition image, read from its file once per evaluator (sampling and every reward share it)."""
        if row.image not in self._images:
            self._images[row.image] = row.load()
        return self._images[row.image]

    def _call(self, reward, images, prompts, idx):
        """reward(images, prompts), with the rows' metadata when they have condition images."""
        meta = self._metadata(idx)
        return reward(images, prompts) if meta is None else reward(images, prompts, meta)

    def _metadata(self, idx: list) -> Optional[list]:
        rows = [self.image_rows[i] for i in idx]
        if any(r is None for r in rows):
            return None
        return [{"condition_image": self._load(r), **({"references": list(r.references)} if r.references else {})}
                for r in rows]

    def score(self, images: torch.Tensor) -> dict:
        """Scores of images [N,3,H,W] (in the order of ``self.prompts``) -> {key: mean}."""
        from ..toy import GENEVAL_TASKS, TEXT_TASK
        from ..toy.geneval import score_batch, summarize

        by_task = defaultdict(list)
        for i, task in enumerate(self.tasks):
            by_task[task].append(i)
        out, totals = {}, defaultdict(list)  # totals: reward -> per-image scores over all its prompts

        def record(name: str, task: str, values: torch.Tensor) -> None:
            out[f"{name}/{task}"] = values.float().mean().item()
            totals[name].append(values.float())

        for task, idx in by_task.items():
            prompts = [self.prompts[i] for i in idx]
            if task in GENEVAL_TASKS:
                results = score_batch(images[idx], prompts)
                frac, strict, per_task = summarize(results)
                extra = torch.tensor([r["extra_objects"] for r in results])
                record("toy_geneval", task, frac)
                record("toy_geneval_strict", task, strict)
                record("toy_geneval_exact", task, strict * (1 - extra))  # = the no_extra reward's strict score
                record("toy_extra_objects", task, extra)
                for kind, rate in per_task[task]["checks"].items():  # where the scores are lost
                    out[f"toy_check/{task}/{kind}"] = rate
            elif task == TEXT_TASK:
                record("ocr", task, self._reward("ocr")(images[idx], prompts))
            else:
                reward = self.train_rewards.get(self.source_of.get(task))
                if reward is not None:
                    record(reward.name, task, self._call(reward, images[idx], prompts, idx))
            for name in self.extra:
                if not (name == "toy_geneval" and task in GENEVAL_TASKS) and not (name == "ocr" and task == TEXT_TASK):
                    record(name, task, self._call(self._reward(name), images[idx], prompts, idx))
        for name, parts in totals.items():
            values = torch.cat(parts).double()
            out[name] = values.mean().item()
            # the standard error of that mean over the images: sample std / sqrt(n) (0 for one image)
            out[f"se/{name}"] = (values.std() / len(values) ** 0.5).item() if len(values) > 1 else 0.0
        out["n"] = len(self.prompts)
        return out
