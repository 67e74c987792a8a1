"""Scene grammar of the offline world: specs, prompt templates, parsing, sampling, splits.

A prompt is one of the templates in ``TEMPLATES`` (GenEval's six tasks plus a text task)::

    single_object  "a circle"                          >= 1 circle, any colour
    colors         "a red circle"                      >= 1 red circle
    counting       "three blue squares"                exactly 3 blue squares (counts 1-4)
    two_object     "a circle and a triangle"           >= 1 of each shape, any colours
    color_attr     "a red circle and a green square"   >= 1 red circle and >= 1 green square
    position       "a red circle to the left of a blue square"   both present, relation by boxes
    text           'the text "AB"'                     1-3 capital letters, for the OCR reward

``parse_prompt`` inverts ``caption`` exactly (parse(caption(spec)) == spec), so a reward can
score any prompt of the grammar. The held-out split is a fixed ~10% of prompts chosen by a hash
of the prompt text (``split_of``); ``sample`` only ever draws prompts of the requested split.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import string
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = ("one", "two", "three", "four")
MAX_COUNT = len(NUMBERS)
GENEVAL_TASKS = ("single_object", "colors", "counting", "two_object", "color_attr", "position")
TEXT_TASK = "text"
TASKS = GENEVAL_TASKS + (TEXT_TASK,)
TEXT_LETTERS = string.ascii_uppercase
TEXT_MAX_LEN = 3

TEMPLATES = {
    "single_object": "a {shape}",
    "colors": "a {color} {shape}",
    "counting": "{number} {color} {shape}s",
    "two_object": "a {shape} and a {shape2}",
    "color_attr": "a {color} {shape} and a {color2} {shape2}",
    "position": "a {color} {shape} {relation} a {color2} {shape2}",
    "text": 'the text "{text}"',
}
_REL_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_PHRASE_REL = {v: k for k, v in _REL_PHRASE.items()}

HELDOUT_PERMILLE = 100  # ~10% of prompts are held out: sha256(prompt) % 1000 < 100
POSITION_THRESHOLD = 0.1  # GenEval's margin, as a fraction of the summed box sizes


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one shape; ``color=None`` means any colour."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} not in {SHAPES}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color {self.color!r} not in {COLORS}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count {self.count} not in 1..{MAX_COUNT}")


@dataclass(frozen=True)
class SceneSpec:
    """The constraints of one prompt.

    ``objects`` has 1 entry (single_object, colors, counting) or 2 (two_object, color_attr,
    position; then ``relation`` says where objects[0] is relative to objects[1]). Counts are
    exact for ``counting`` and "at least" elsewhere. ``text`` is set only for the text task.
    """

    task: str
    objects: tuple[ObjectSpec, ...] = ()
    relation: str | None = None
    text: str | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} not in {TASKS}")
        if self.task == TEXT_TASK:
            if not self.text or len(self.text) > TEXT_MAX_LEN or not set(self.text) <= set(TEXT_LETTERS):
                raise ValueError(f"text must be 1-{TEXT_MAX_LEN} capital letters, got {self.text!r}")
            return
        n = 2 if self.task in ("two_object", "color_attr", "position") else 1
        if len(self.objects) != n:
            raise ValueError(f"task {self.task} needs {n} object(s), got {len(self.objects)}")
        if (self.relation is not None) != (self.task == "position"):
            raise ValueError("a relation is required for position and only for position")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation {self.relation!r} not in {RELATIONS}")
        colored = [o.color is not None for o in self.objects]
        if self.task in ("single_object", "two_object") and any(colored):
            raise ValueError(f"{self.task} prompts name no colour")
        if self.task in ("colors", "color_attr") and not all(colored):
            raise ValueError(f"{self.task} prompts name a colour for every object")
        if self.task != "counting" and any(o.count != 1 for o in self.objects):
            raise ValueError("only counting prompts have a count other than one")
        if n == 2 and self.objects[0] == self.objects[1]:
            raise ValueError("the two objects of a prompt must differ")
        if self.task == "color_attr" and self.objects[0].color == self.objects[1].color:
            raise ValueError("color_attr needs two distinct colours")

    @property
    def prompt(self) -> str:
        return caption(self)


def _noun_phrase(o: ObjectSpec, counted: bool) -> str:
    head = NUMBERS[o.count - 1] if counted else "a"
    noun = o.shape + ("s" if o.count > 1 else "")
    return " ".join(w for w in (head, o.color, noun) if w)


def caption(spec: SceneSpec) -> str:
    """The canonical prompt of a spec (lower case, single spaces, no final period)."""
    if spec.task == TEXT_TASK:
        return TEMPLATES[TEXT_TASK].format(text=spec.text)
    nps = [_noun_phrase(o, spec.task == "counting") for o in spec.objects]
    if len(nps) == 1:
        return nps[0]
    joiner = "and" if spec.relation is None else _REL_PHRASE[spec.relation]
    return f"{nps[0]} {joiner} {nps[1]}"


_NP = r"(a|one|two|three|four) (?:(red|green|blue|yellow) )?(circle|square|triangle)(s?)"
_JOIN = "|".join(["and"] + [re.escape(p) for p in _REL_PHRASE.values()])
_RE_ONE = re.compile(rf"^{_NP}$")
_RE_TWO = re.compile(rf"^{_NP} ({_JOIN}) {_NP}$")
_RE_TEXT = re.compile(r'^the text "([A-Z]{1,%d})"$' % TEXT_MAX_LEN)


def _supported() -> str:
    return "; ".join(f"{t}: {tpl!r}" for t, tpl in TEMPLATES.items())


def parse_prompt(prompt: str) -> SceneSpec:
    """Parse a prompt of the grammar into its ``SceneSpec``; ValueError for anything else.

    Case, surrounding space, repeated spaces and a final period are forgiven (not inside the
    quoted text). The result satisfies ``caption(parse_prompt(p)) == normalised p``.
    """
    p = " ".join(str(prompt).strip().rstrip(".").split())
    m = _RE_TEXT.match(p[:10].lower() + p[10:]) if p.lower().startswith("the text ") else None
    if m:
        return SceneSpec(TEXT_TASK, text=m.group(1))
    p = p.lower()
    try:
        if m := _RE_ONE.match(p):
            obj, counted = _object(*m.groups())
            task = "counting" if counted else ("colors" if obj.color else "single_object")
            spec = SceneSpec(task, (obj,))
        elif m := _RE_TWO.match(p):
            g = m.groups()
            (a, ca), (b, cb) = _object(*g[:4]), _object(*g[5:])
            if ca or cb or a.count != 1 or b.count != 1:
                raise ValueError("two-object prompts use 'a', not a number")
            if g[4] == "and":
                task = "color_attr" if a.color or b.color else "two_object"
                spec = SceneSpec(task, (a, b))
            else:
                spec = SceneSpec("position", (a, b), relation=_PHRASE_REL[g[4]])
        else:
            raise ValueError("no template matches")
        if caption(spec) != p:
            raise ValueError(f"not in canonical form (expected {caption(spec)!r})")
    except ValueError as e:
        shown = repr(prompt) if len(prompt) <= 60 else repr(prompt[:57] + "...")
        raise ValueError(f"cannot parse prompt {shown} ({e}); supported templates: {_supported()}") from None
    return spec


def _object(head: str, color: str | None, shape: str, plural: str) -> tuple[ObjectSpec, bool]:
    """(ObjectSpec, whether the phrase is counted with a number word)."""
    count = 1 if head == "a" else NUMBERS.index(head) + 1
    if (count > 1) != (plural == "s"):
        raise ValueError(f"number and plural disagree in '{head} ... {shape}{plural}'")
    return ObjectSpec(shape, color, count), head != "a"


def relation_direction(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> tuple[float, float]:
    """(dx, dy) in [-1, 1]^2, GenEval's shrunk direction from box b to box a; boxes are (x0, y0, x1, y1), y down.

    offset = centre_a - centre_b; shrunk = sign(offset) * max(|offset| - threshold * (dim_a + dim_b), 0);
    (dx, dy) = shrunk / |offset|, (0, 0) when the boxes are (nearly) concentric.
    """
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    shrunk = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    norm = float(np.linalg.norm(offset))
    if norm < 1e-6 or np.all(np.abs(shrunk) < 1e-3):
        return 0.0, 0.0
    dx, dy = shrunk / norm
    return float(dx), float(dy)


def relation_margin(relation: str, dx: float, dy: float) -> float:
    """The component of :func:`relation_direction` along ``relation``: -dx (left of), dx (right of), -dy
    (above), dy (below); the relation holds iff it is > 0.5."""
    return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}[relation]


def relations_of(box_a, box_b, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Relations of box a to box b, GenEval's rule: ``relation`` holds iff its :func:`relation_margin` of
    :func:`relation_direction` is > 0.5 ("left of" iff dx < -0.5, ...). Empty when concentric."""
    d = relation_direction(box_a, box_b, threshold)
    return {r for r in RELATIONS if relation_margin(r, *d) > 0.5}


def split_of(prompt: str) -> str:
    """'heldout' for a fixed ~10% of prompts (sha256 of the canonical prompt), else 'train'."""
    h = int(hashlib.sha256(caption(parse_prompt(prompt)).encode()).hexdigest(), 16)
    return "heldout" if h % 1000 < HELDOUT_PERMILLE else "train"


@lru_cache(maxsize=None)
def all_prompts(task: str) -> tuple[str, ...]:
    """Every prompt the sampler can produce for ``task`` (sorted, deterministic)."""
    obj = [ObjectSpec(s, c) for c in COLORS for s in SHAPES]
    if task == "single_object":
        specs = [SceneSpec(task, (ObjectSpec(s),)) for s in SHAPES]
    elif task == "colors":
        specs = [SceneSpec(task, (o,)) for o in obj]
    elif task == "counting":
        specs = [SceneSpec(task, (ObjectSpec(o.shape, o.color, n),)) for o in obj for n in range(1, MAX_COUNT + 1)]
    elif task == "two_object":
        specs = [SceneSpec(task, (ObjectSpec(a), ObjectSpec(b))) for a, b in itertools.permutations(SHAPES, 2)]
    elif task == "color_attr":
        specs = [SceneSpec(task, (a, b)) for a, b in itertools.product(obj, obj) if a.color != b.color]
    elif task == "position":
        specs = [SceneSpec(task, (a, b), r) for a, b in itertools.permutations(obj, 2) for r in RELATIONS]
    elif task == TEXT_TASK:
        words = ("".join(w) for n in range(1, TEXT_MAX_LEN + 1) for w in itertools.product(TEXT_LETTERS, repeat=n))
        specs = [SceneSpec(task, text=w) for w in words]
    else:
        raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
    return tuple(sorted(caption(s) for s in specs))


@lru_cache(maxsize=None)
def prompts_in_split(task: str, split: str) -> tuple[str, ...]:
    """The prompts of ``task`` in ``split`` ('train' or 'heldout')."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return tuple(p for p in all_prompts(task) if split_of(p) == split)


def sample(rng: np.random.Generator | int, task: str | None = None, split: str = "train",
           tasks: tuple[str, ...] = GENEVAL_TASKS) -> tuple[str, SceneSpec]:
    """One (prompt, spec): task uniform over ``tasks`` (unless given), prompt uniform in the split.

    Text prompts are drawn length-uniform (1-3 letters) rather than uniform over all words.
    """
    rng = np.random.default_rng(rng)
    task = task or tasks[rng.integers(len(tasks))]
    if task == TEXT_TASK:
        for _ in range(1000):
            word = "".join(rng.choice(list(TEXT_LETTERS), rng.integers(1, TEXT_MAX_LEN + 1)))
            p = TEMPLATES[TEXT_TASK].format(text=word)
            if split_of(p) == split:
                return p, parse_prompt(p)
        raise RuntimeError("no text prompt found in split")  # unreachable in practice
    pool = prompts_in_split(task, split)
    if not pool:
        raise ValueError(f"task {task} has no prompts in split {split!r}")
    p = pool[rng.integers(len(pool))]
    return p, parse_prompt(p)


def noisy_caption(prompt: str, rng: np.random.Generator, p: float) -> str:
    """Web-caption-like label noise for pretraining: with probability ``p`` the caption misstates the scene.

    counting: the count is off by one (``"three red squares"`` -> ``"two red squares"``); position: another
    relation; color_attr: the two colours swapped between the shapes. Other tasks are returned unchanged, as is
    any mislabel that would name a held-out prompt (held-out prompts never appear in pretraining). A base
    trained on such captions draws every object well but follows counts, relations and colour bindings
    imperfectly, the kind of error alignment is meant to fix.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"caption noise p must be in [0, 1], got {p}")
    spec = parse_prompt(prompt)
    if spec.task not in ("counting", "position", "color_attr") or rng.random() >= p:
        return prompt
    if spec.task == "counting":
        o = spec.objects[0]
        counts = [n for n in (o.count - 1, o.count + 1) if 1 <= n <= MAX_COUNT]
        new = SceneSpec(spec.task, (ObjectSpec(o.shape, o.color, int(rng.choice(counts))),))
    elif spec.task == "position":
        others = [r for r in RELATIONS if r != spec.relation]
        new = SceneSpec(spec.task, spec.objects, others[rng.integers(len(others))])
    else:
        a, b = spec.objects
        new = SceneSpec(spec.task, (ObjectSpec(a.shape, b.color), ObjectSpec(b.shape, a.color)))
    wrong = caption(new)
    return wrong if split_of(wrong) == "train" else prompt


def sample_batch(n: int, seed: int = 0, split: str = "train",
                 tasks: tuple[str, ...] = GENEVAL_TASKS) -> list[tuple[str, SceneSpec]]:
    """``n`` seeded (prompt, spec) pairs; the same seed gives the same list."""
    rng = np.random.default_rng(seed)
    return [sample(rng, split=split, tasks=tasks) for _ in range(n)]
