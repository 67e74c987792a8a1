"""GenEval-style scoring of detections against a prompt of the toy grammar.

Each prompt becomes a list of named boolean checks (a detection "matches" an object phrase when
its shape agrees and, if the phrase names one, its colour agrees):

    single_object  "a circle"                       present(circle)
    colors         "a red circle"                   present(circle), present(red circle)
    counting       "three blue squares"             present(blue square), count(blue square) == 3
    two_object     "a circle and a square"          present(circle), present(square)
    color_attr     "a red circle and a blue square" present(circle), present(square),
                                                    present(red circle), present(blue square)
    position       "a red circle left of a blue square"
                                                    present(red circle), present(blue square),
                                                    every (a, b) pair has relation (GenEval's rule)

fraction = (#checks met) / (#checks) in [0, 1]; strict = 1.0 iff all checks are met.

Like GenEval, these checks ignore objects the prompt did not ask for, so an aligned model can gain by
drawing extras (which also breaks counts and relations). ``no_extra=True`` adds one check,
``#detections <= #objects asked`` (named "no extra objects", or "no extra objects (n > k)" when it fails),
for use as a TRAINING reward; held-out evaluation keeps the GenEval checks.

``partial=True``, also a training-reward option, grades two sparse checks when they fail, so that a group of
rollouts that all miss them still ranks near misses above far ones (a passed check still scores 1 and the
strict score is unchanged):

    count(x)==n   failed: 1/2 * max(0, 1 - |found - n| / n)
    a REL b       failed: 1/2 * mean over (a, b) pairs of (m + 1) / 2, m = relation_margin in [-1, 1]
                  (GenEval's rule passes at m > 0.5), 0 when a or b is missing

Text prompts are for the OCR reward and raise here.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .detect import Detected, detect
from .grammar import TEXT_TASK, ObjectSpec, SceneSpec, parse_prompt, relation_direction, relation_margin, relations_of


def _matches(d: Detected, o: ObjectSpec) -> bool:
    return d.shape == o.shape and (o.color is None or d.color == o.color)


def _name(o: ObjectSpec) -> str:
    return f"{o.color} {o.shape}" if o.color else o.shape


def _found(spec: SceneSpec, dets: Sequence[Detected]) -> list[list[Detected]]:
    """Per object phrase of ``spec``, the detections that match it."""
    return [[d for d in dets if _matches(d, o)] for o in spec.objects]


def _count_check(o: ObjectSpec) -> str:
    return f"count({_name(o)})=={o.count}"


def _relation_check(spec: SceneSpec) -> str:
    a, b = spec.objects
    return f"{_name(a)} {spec.relation} {_name(b)}"


def extra_objects(spec: SceneSpec, dets: Sequence[Detected]) -> int:
    """How many more objects were detected than ``spec`` asks for (0 when not more)."""
    return max(0, len(dets) - sum(o.count for o in spec.objects))


def checks(spec: SceneSpec, dets: Sequence[Detected], no_extra: bool = False) -> dict[str, bool]:
    """Named checks of ``spec`` (see the module docstring) evaluated on ``dets``."""
    if spec.task == TEXT_TASK:
        raise ValueError("text prompts are scored by the OCR reward, not by toy GenEval")
    out: dict[str, bool] = {}
    found = _found(spec, dets)
    if spec.task in ("colors", "color_attr"):  # shape presence first, then attribution
        for o in spec.objects:
            out[f"present({o.shape})"] = any(d.shape == o.shape for d in dets)
    for o, f in zip(spec.objects, found):
        out[f"present({_name(o)})"] = bool(f)
    if spec.task == "counting":
        o = spec.objects[0]
        out[_count_check(o)] = len(found[0]) == o.count
    if spec.task == "position":
        out[_relation_check(spec)] = bool(found[0] and found[1]) and all(
            spec.relation in relations_of(da.bbox, db.bbox) for da in found[0] for db in found[1])
    if no_extra:
        extra = extra_objects(spec, dets)
        out[f"no extra objects ({len(dets)} > {len(dets) - extra})" if extra else "no extra objects"] = not extra
    return out


def partial_credits(spec: SceneSpec, dets: Sequence[Detected], c: dict[str, bool]) -> dict[str, float]:
    """Credit in [0, 1] of each check in ``c`` (= ``checks(spec, dets, ...)``): 1 when met, else 0, except a
    failed count or relation, graded in [0, 1/2] (module docstring)."""
    credit = {k: float(v) for k, v in c.items()}
    found = _found(spec, dets)
    if spec.task == "counting":
        o = spec.objects[0]
        key = _count_check(o)
        if not c[key]:
            credit[key] = 0.5 * max(0.0, 1 - abs(len(found[0]) - o.count) / o.count)
    if spec.task == "position":
        key = _relation_check(spec)
        if not c[key] and found[0] and found[1]:
            m = [relation_margin(spec.relation, *relation_direction(da.bbox, db.bbox))
                 for da in found[0] for db in found[1]]
            credit[key] = 0.5 * sum((x + 1) / 2 for x in m) / len(m)
    return credit


def score(prompt: str | SceneSpec, detections: Sequence[Detected], no_extra: bool = False,
          partial: bool = False) -> dict:
    """-> {"task", "fraction" (float in [0,1]), "strict" (0.0 or 1.0), "checks" {name: bool},
    "extra_objects" (1.0 iff more objects were detected than the prompt asks for)}; ``partial``: the fraction
    sums :func:`partial_credits` instead of the met checks."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    c = checks(spec, detections, no_extra)
    met = sum(c.values())
    total = sum(partial_credits(spec, detections, c).values()) if partial else met
    return {"task": spec.task, "fraction": total / len(c), "strict": float(met == len(c)), "checks": c,
            "extra_objects": float(extra_objects(spec, detections) > 0)}


def toy_geneval(images, prompts: Sequence[str | SceneSpec], no_extra: bool = False, partial: bool = False,
                **detect_kwargs) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, float]]]:
    """Score a batch. images: tensor [B,3,H,W] in [0,1] or a list of PIL images / [3,H,W] tensors.
    ``no_extra`` adds the "no extra objects" check, ``partial`` grades failed counts and relations (module
    docstring); both are training-reward options.

    Returns (fraction [B] float32, strict [B] float32, {task: {"fraction", "strict", "extra_objects", "n",
    "checks"}}), the per-task entries being means over the batch items of that task, and "checks" the pass
    rate of each check kind (:func:`check_kind`), where the scores are lost.
    """
    return summarize(score_batch(images, prompts, no_extra, partial, **detect_kwargs))


def score_batch(images, prompts: Sequence[str | SceneSpec], no_extra: bool = False, partial: bool = False,
                **detect_kwargs) -> list[dict]:
    """:func:`score` of each image (images as in :func:`toy_geneval`) -> one dict per image, in order."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return [score(p, detect(im, **detect_kwargs), no_extra, partial) for im, p in zip(images, prompts)]


def summarize(results: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, dict[str, dict[str, float]]]:
    """Per-image :func:`score` dicts -> :func:`toy_geneval`'s (fraction [B], strict [B], per-task means)."""
    frac = torch.tensor([r["fraction"] for r in results], dtype=torch.float32)
    strict = torch.tensor([r["strict"] for r in results], dtype=torch.float32)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        groups[r["task"]].append(r)
    per_task = {t: {"fraction": sum(r["fraction"] for r in rs) / len(rs),
                    "strict": sum(r["strict"] for r in rs) / len(rs),
                    "extra_objects": sum(r["extra_objects"] for r in rs) / len(rs), "n": len(rs),
                    "checks": {k: met / made for k, (met, made) in check_rates(rs).items()}}
                for t, rs in sorted(groups.items())}
    return frac, strict, per_task


DIAGNOSTIC_KINDS = ("shape", "colour+shape", "count", "relation")


def diagnostics(images, prompts: Sequence[str | SceneSpec]) -> dict[str, torch.Tensor]:
    """Per-image statistics of the toy world that reveal hedging (flowalign.evaluation.drift): ``extra_objects``
    (1 when the image holds more objects than the prompt asked for) and ``check/<kind>`` (the share of the image's
    checks of that kind that pass; NaN when its prompt has none). Each float32 [B]."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    results = [score(p, detect(im)) for im, p in zip(images, prompts)]
    out = {"extra_objects": torch.tensor([r["extra_objects"] for r in results], dtype=torch.float32)}
    for kind in DIAGNOSTIC_KINDS:
        rates = []
        for r in results:
            mine = [ok for name, ok in r["checks"].items() if check_kind(name) == kind]
            rates.append(sum(mine) / len(mine) if mine else float("nan"))
        out[f"check/{kind}"] = torch.tensor(rates, dtype=torch.float32)
    return out


def check_kind(name: str) -> str:
    """The kind of a check named by :func:`checks`: "shape" (present(circle)), "colour+shape" (present(red
    circle)), "count", "relation" or "no extra"."""
    if name.startswith("present("):
        return "colour+shape" if " " in name[len("present("):-1] else "shape"
    if name.startswith("count("):
        return "count"
    if name.startswith("no extra objects"):
        return "no extra"
    return "relation"


_GIVEN_DRAWN = {"relation": "relation, objects drawn", "count": "count, object drawn"}  # conditional kinds


def check_rates(results: Sequence[dict]) -> dict[str, tuple[int, int]]:
    """Where scores are lost: {check kind: (checks met, checks made)} over :func:`score` results, one entry per
    (image, check) pair (a two-object prompt makes two "colour+shape" checks).

    Two conditional kinds separate drawing from placing and counting: "relation, objects drawn" is the relation
    check over the images whose named objects are all present (met / made = P(relation | both drawn)), and
    "count, object drawn" the count check over the images where the named object is present at all. A kind
    appears only when some image qualifies.
    """
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in results:
        drawn = all(ok for name, ok in r["checks"].items() if check_kind(name) == "colour+shape")
        for name, ok in r["checks"].items():
            kind = check_kind(name)
            tally = out[kind]
            tally[0] += int(ok)
            tally[1] += 1
            if kind in _GIVEN_DRAWN and drawn:
                cond = out[_GIVEN_DRAWN[kind]]
                cond[0] += int(ok)
                cond[1] += 1
    return {k: tuple(v) for k, v in sorted(out.items())}
