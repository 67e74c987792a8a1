"""Seeded fuzz of every way a config is built (YAML files, ``key=value`` overrides, ``config_from_dict``, the section
dataclasses called from Python) and of prompt files: bad input raises only the library's own errors, each one line
of at most 300 characters that never echoes a file's contents; what is accepted is valid (finite numbers of the
right types, in range). No model is loaded; the whole fuzz takes a few seconds.

``run_fuzz(config_module, prompts_module)`` is the harness; it can be pointed at another copy of the modules (e.g.
an older revision loaded under another name) to compare counts."""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import random
import traceback
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import flowalign.config as C
import flowalign.prompts as P
from flowalign.errors import FlowalignError

SECRET = "SECRET-CONTENT-0xC0FFEE"  # written into the files the fuzz points paths at; no message may show it
MB = "x" * 1_000_000
NAN, INF = float("nan"), float("inf")


def _deep_list(depth: int):
    root = cur = []
    for _ in range(depth):
        nxt = []
        cur.append(nxt)
        cur = nxt
    return root


def _deep_dict(depth: int):
    root = cur = {}
    for _ in range(depth):
        cur["a"] = {}
        cur = cur["a"]
    return root


def _self_ref():
    x = []
    x.append(x)
    return x


def _alias_bomb():
    """A YAML alias bomb's shape: 9 levels of 10 references to one list (1e9 leaves if walked naively)."""
    v = [1] * 10
    for _ in range(9):
        v = [v] * 10
    return v


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def _pool(files: dict) -> list:
    return [
        None, True, False, 0, 1, -1, 2, 3, 7, 100, 2**31, 2**63 - 1, 2**63, 2**64, 10**400, -10**30,
        0.0, -0.0, 0.5, 0.99, 1.0, 1.5, 2.5, -0.1, -1.0, 1e-4, 5e-324, 1e308, -1e308, NAN, INF, -INF,
        "", "x", " ", "toy", "toy:text", "toy:nope", "toy:", "1e-4", "nan", "inf", ".inf", "-1", "0x10", "1_000",
        MB, "a\x00b", "\n", "cuda:x", "cpu", "cuda:0", "flow_ode", "flow_sde", "ddim", "grpo", "crd", "opd", "nft",
        "float16", "sd3", "wandb", "js", "alpha", "0-0.25-0.005-0.999", "0-0.25-inf-0.999", "fast",
        files["passwd"], files["mb_line"], files["binary"], files["dir"], "/no/such/file.txt", "../" * 2000 + "x",
        [], [0], [0, 2], [1, 3], [0, 1, 2], [2.5, 1], [NAN, 1], [INF, 2], ["a", 1], [[1]], [True, 2], [-1, 2],
        [0.1, 0.9], (0.02, 0.98), [0.5, 0.2], ["attn.to_q"], [""], [1, 2], ["wandb", "wandb"], ["tensorboard"],
        ["clip_score"], [MB],
        {}, {"a": 1}, {1: 2}, {"lora": "x"}, {"url": "http://x"}, {"t": {"lora": "x", "guidance_scale": NAN}},
        {"t": {"lora": "x", "guidance_scale": -1}}, {"t": {"lora": MB}}, {"t": {"lora": "x", "cfg": 2}},
        {"": {"lora": "x"}}, {5: {"lora": "x"}}, {"t": {"lora": "x", "prompts": 3}}, {"t": "x"},
        _deep_list(40), _deep_list(3000), _deep_dict(40), _deep_dict(3000), _self_ref(), _alias_bomb(),
        object(), _BadRepr(), b"bytes", complex(1, 2), {1, 2}, np.float32(NAN), np.float64(INF), np.int64(5),
        np.float64(0.5), np.bool_(True), Decimal("1.5"), Decimal("NaN"), Fraction(1, 3), datetime.date(2024, 1, 1),
        Path("/tmp/x"), Path(files["passwd"]),
    ]


YAML_TEXTS = [
    ".inf", "-.inf", ".nan", "-1", "0", "-0.0", "1e-4", "1e400", "2.5", "1.0e+308", "10" * 300, "true", "yes", "~",
    "null", "''", "[]", "{}", "[0, 2]", "[1.5, 2]", "[.nan, 1]", "[a, 1]", "{url: x}", "{1: 2}", "[wandb, wandb]",
    "toy:nope", "0x1F", "1_000", "2024-13-45", "2024-01-01", "!!timestamp x", "!!float abc", "!!int abc",
    "!!binary AAAA", "!!set {a}", "!!python/object:os.system", "&a [*a]", "*x", "[", "{a: 1", "'unclosed",
    "a: b: c", "\t", "\x00", "!!pairs [{a: 1}]", "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]",
    "{t: {lora: x, guidance_scale: .nan}}", "{t: {lora: x, guidance_scale: .inf}}",
]
YAML_HEAVY = ["[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000, "'" + "x" * 200_000 + "'",
              "- " * 2000 + "1", "&a [" + ", ".join(["*a"] * 3) + "]"]
BAD_KEYS = ["nosuch.key", "train.", ".lr", "train", "train.lr.x", "opd.teachers.a.b.c", "train.nosuch",
            "opd.teachers." + "a." * 50 + "lora", "x" * 100_000 + ".y", "train." + "y" * 100_000, "trian.lr",
            "model.path.x", "train.reward_options.url", "opd.teachers.t.lora", "opd.teachers.t.guidance_scale",
            "opd.teachers..lora", "grpo.adv_std", "crd.old_decay_max", "train.lr\x00"]


def _files(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    (root / "passwd").write_text(f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1:{SECRET}\n")
    (root / "mb_line.txt").write_text("a prompt\n" + SECRET + "y" * 1_000_000 + "\n")
    (root / "binary.bin").write_bytes(b"\x7fELF\x00\xff\xfe" + SECRET.encode() + b"\x00" * 64)
    (root / "empty.txt").write_text("\n \n")
    (root / "nul.txt").write_text(f"ok\n{SECRET}\x00\n")
    (root / "good.txt").write_text("a photo of a cat\r\na photo of a dog\rthird\n")
    (root / "dir").mkdir(exist_ok=True)
    yaml_files = {
        "deep.yaml": "[" * 5000 + "]" * 5000, "deepmap.yaml": "train:\n" + "".join(
            "  " * (i + 1) + f"k{i}:\n" for i in range(200)) + "  " * 201 + "1\n",
        "list.yaml": "- 1\n- 2\n", "scalar.yaml": SECRET + "\n", "passwd.yaml": (root / "passwd").read_text(),
        "section.yaml": "train: 5\n", "keys.yaml": "1: {}\n", "nan.yaml": "train: {lr: .nan, grad_clip: .inf}\n",
        "bomb.yaml": "a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
            f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + "train: {reward_options: {x: *i}}\n",
        "selfref.yaml": "train: {reward_options: &a {x: *a}}\n", "tab.yaml": "train:\n\tlr: 1\n",
        "bigkey.yaml": "train: {" + "k" * 100_000 + ": 1}\n", "bigval.yaml": f"train: {{prompts: '{MB}'}}\n",
        "alias.yaml": f"train: {{lr: *{'z' * 5000}}}\n", "date.yaml": "train: {lr: 2024-13-45}\n",
        "tag.yaml": "train: {lr: !!python/object:os.system x}\n", "multi.yaml": "a: 1\n---\nb: 2\n",
    }
    for name, text in yaml_files.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00train" + SECRET.encode())
    (root / "huge.yaml").write_text("# " + "x" * (C.MAX_CONFIG_BYTES + 10) + "\n" if hasattr(C, "MAX_CONFIG_BYTES")
                                    else "# " + "x" * ((1 << 20) + 10) + "\n")
    return {"root": str(root), "passwd": str(root / "passwd"), "mb_line": str(root / "mb_line.txt"),
            "binary": str(root / "binary.bin"), "dir": str(root / "dir"),
            "yaml": sorted(str(p) for p in root.glob("*.yaml")),
            "prompt_files": [str(root / n) for n in ("passwd", "mb_line.txt", "binary.bin", "empty.txt", "nul.txt",
                                                     "good.txt", "dir", "no-such.txt")]}


RULES = {("train", "lr"): lambda v: v > 0, ("train", "grad_clip"): lambda v: v > 0,
         ("train", "weight_decay"): lambda v: v >= 0, ("sampling", "guidance_scale"): lambda v: v >= 0,
         ("sampling", "eval_guidance_scale"): lambda v: v is None or v >= 0,
         ("model", "lora_dropout"): lambda v: 0 <= v < 1, ("model", "lora_alpha"): lambda v: v is None or v > 0,
         ("advantage", "clip"): lambda v: v > 0, ("train", "seed"): lambda v: 0 <= v < 2**63,
         ("train", "ema_decay"): lambda v: 0 <= v < 1, ("train", "iterations"): lambda v: v > 0}


def _invalid_section(name: str, part) -> str | None:
    """Why an accepted section is plainly invalid: a field of the wrong type, NaN / inf, or out of ``RULES``."""
    for f in dataclasses.fields(part):
        v, t = getattr(part, f.name), str(f.type)
        where = f"{name}.{f.name}={v!r:.60}"
        if v is None:
            if not t.startswith("Optional["):
                return where
            continue
        if "float" in t and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            return where
        if "int" in t and (isinstance(v, bool) or not isinstance(v, int)):
            return where
        if ("str" in t and not isinstance(v, str)) or ("bool" in t and not isinstance(v, bool)):
            return where
        if "tuple" in t and not isinstance(v, (list, tuple)) or "dict" in t and not isinstance(v, dict):
            return where
        rule = RULES.get((name, f.name))
        try:
            good = rule is None or bool(rule(v))
        except Exception:  # noqa: BLE001 - a value the rule cannot even compare
            good = False
        if not good:
            return where
    if name == "opd":
        for task, spec in part.teachers.items():
            g = spec.get("guidance_scale", 1.0) if isinstance(spec, dict) else None
            if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g <= 0:
                return f"opd.teachers.{task!r:.30}.guidance_scale"
    return None


def _invalid_accepted(Cm, result) -> str | None:
    """Why an accepted Config (or section) is plainly invalid (None when it is not)."""
    names = {cls: name for name, cls in Cm._SECTION_CLASSES.items()}
    if type(result) in names:
        return _invalid_section(names[type(result)], result)
    if not isinstance(result, Cm.Config):
        return None
    for name, cls in Cm._SECTION_CLASSES.items():
        part = getattr(result, name)
        if not isinstance(part, cls):
            return f"Config.{name} is a {type(part).__name__}"
        why = _invalid_section(name, part)
        if why:
            return why
    return None


def _cases(Cm, Pm, files: dict, n: int, seed: int):
    """(kind, thunk) pairs: n random ones plus the fixed heavy / file cases."""
    rng = random.Random(seed)
    pool = _pool(files)
    sections = {name: [f.name for f in dataclasses.fields(cls)] for name, cls in Cm._SECTION_CLASSES.items()}
    choices = ["flow_ode", "flow_sde", "flow_dpm2", "ddim", "nft", "crd", "opd", "backprop", "grpo", "fsdp", "js"]

    def value(section, key):
        r = rng.random()
        cls = Cm._SECTION_CLASSES[section]
        default = next(f for f in dataclasses.fields(cls) if f.name == key)
        d = default.default if default.default is not dataclasses.MISSING else default.default_factory()
        if r < 0.15:
            return d
        if r < 0.3 and isinstance(d, (int, float)) and not isinstance(d, bool):
            return rng.choice([-d, d * 10, d + 0.5, d - 1, NAN, INF, -INF, 0, int(d) + 1, float(d) / 3])
        if r < 0.35:
            return rng.choice(choices)
        return rng.choice(pool)

    def pick():
        section = rng.choice(list(sections))
        return section, rng.choice(sections[section])

    base = Cm.Config()
    out = []
    for _ in range(n):
        mode = rng.random()
        if mode < 0.35:  # config_from_dict, a few keys of one or two sections
            data = {}
            for _ in range(rng.randint(1, 3)):
                section, key = pick()
                data.setdefault(section, {})[key] = value(section, key)
            out.append(("dict", lambda d=data: Cm.config_from_dict(d)))
        elif mode < 0.5:  # with_overrides with Python values
            section, key = pick()
            dotted = rng.choice(BAD_KEYS) if rng.random() < 0.15 else f"{section}.{key}"
            out.append(("overrides", lambda k=dotted, v=value(section, key): Cm.with_overrides(base, {k: v})))
        elif mode < 0.7:  # key=value strings through parse_overrides
            section, key = pick()
            dotted = rng.choice(BAD_KEYS) if rng.random() < 0.15 else f"{section}.{key}"
            item = f"{dotted}={rng.choice(YAML_TEXTS)}" if rng.random() < 0.9 else rng.choice(
                ["train.lr", "=1", "train.lr==1", "lr=1", ".=1", "train.lr=1e-3=2", MB + "=1"])
            out.append(("parse", lambda i=item: Cm.with_overrides(base, Cm.parse_overrides([i]))))
        elif mode < 0.93:  # the dataclasses from Python
            section, key = pick()
            cls = Cm._SECTION_CLASSES[section]
            kw = {key: value(section, key)}
            if rng.random() < 0.3:
                k2 = rng.choice(sections[section])
                kw[k2] = value(section, k2)
            out.append(("dataclass", lambda c=cls, k=kw: c(**k)))
        else:  # garbage where a structure is expected
            v = rng.choice(pool)
            out.append(("structure", rng.choice([
                lambda v=v: Cm.config_from_dict(v),
                lambda v=v: Cm.config_from_dict({v if isinstance(v, (str, int)) else "train": v}),
                lambda v=v, s=rng.choice(list(sections)): Cm.config_from_dict({s: v}),
                lambda v=v: Cm.config_from_dict({"train": {v if isinstance(v, (str, int, float)) else 3: 1}}),
                lambda v=v: Cm.with_overrides(base, v),
                lambda v=v: Cm.with_overrides(v, {}),
                lambda v=v: Cm.parse_overrides(v),
                lambda v=v: Cm.parse_overrides([v]),
                lambda v=v, s=rng.choice(list(sections)): Cm.Config(**{s: v}),
                lambda v=v: Pm.PromptSource(v),
                lambda v=v: Cm.load_config(v),
            ])))
    for text in YAML_HEAVY:
        out.append(("parse", lambda t=text: Cm.with_overrides(base, Cm.parse_overrides([f"train.reward_options={t}"]))))
    for path in files["yaml"]:
        out.append(("yaml", lambda p=path: Cm.load_config(p)))
        out.append(("yaml", lambda p=path: Cm.load_config(p, ["train.lr=.inf"])))
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "toy_grpo.yaml")
    for text in YAML_TEXTS[:20]:
        out.append(("yaml", lambda t=text: Cm.load_config(shipped, [f"train.grad_clip={t}"])))
    for path in files["prompt_files"]:
        out.append(("prompts", lambda p=path: Pm.PromptSource(p)))
        out.append(("prompts", lambda p=path: Pm.read_prompt_file(p)))
        out.append(("prompts", lambda p=path: Cm.load_config(shipped, [f"train.prompts={p}"])))
    return out


class _Hang(BaseException):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_fuzz(Cm=C, Pm=P, root: Path | None = None, n: int = 4000, seed: int = 0, case_timeout: float = 10.0,
             outcomes: list | None = None) -> dict:
    """Counts: cases, clean (the library's one-line errors), accepted, accepted_invalid, bad_messages, tracebacks
    (a case running past ``case_timeout`` seconds counts as one); plus examples of each problem. ``outcomes``
    (a list) gets (kind, outcome, message) per case, to compare two revisions case by case."""
    import signal
    import tempfile

    old = signal.signal(signal.SIGALRM, _alarm)

    tmp = tempfile.TemporaryDirectory() if root is None else None
    files = _files(Path(tmp.name if tmp else root))
    stats = {"cases": 0, "clean": 0, "accepted": 0, "accepted_invalid": 0, "bad_messages": 0, "tracebacks": 0,
             "examples": {"accepted_invalid": [], "bad_messages": [], "tracebacks": []}}
    try:
        for kind, thunk in _cases(Cm, Pm, files, n, seed):
            stats["cases"] += 1
            try:
                signal.setitimer(signal.ITIMER_REAL, case_timeout)
                try:
                    result = thunk()
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except (ValueError, FileNotFoundError, FlowalignError) as err:
                msg = str(err)
                problem = None
                if isinstance(err, UnicodeError):
                    problem = "a raw codec error"
                elif "\n" in msg or "\r" in msg or len(msg) > 300:
                    problem = f"{len(msg)} chars / {len(msg.splitlines())} lines"
                elif SECRET in msg:
                    problem = "echoes file contents"
                if outcomes is not None:
                    outcomes.append((kind, "bad_message" if problem else "clean", msg[:400]))
                if problem:
                    stats["bad_messages"] += 1
                    stats["examples"]["bad_messages"].append(f"{kind}: {problem}: {msg[:200]!r}")
                else:
                    stats["clean"] += 1
            except BaseException as err:  # noqa: BLE001 - the point: anything else is a bug
                if isinstance(err, KeyboardInterrupt):
                    raise
                stats["tracebacks"] += 1
                tb = f"hang: over {case_timeout} s" if isinstance(err, _Hang) else \
                    traceback.format_exception_only(type(err), err)[-1].strip()
                stats["examples"]["tracebacks"].append(f"{kind}: {tb[:200]}")
                if outcomes is not None:
                    outcomes.append((kind, "traceback", tb[:160]))
            else:
                stats["accepted"] += 1
                why = None
                if result is not None:
                    try:
                        why = _invalid_accepted(Cm, result)
                    except Exception as err:  # noqa: BLE001 - a section that is not a section
                        why = f"malformed config ({type(err).__name__})"
                    if why:
                        stats["accepted_invalid"] += 1
                        stats["examples"]["accepted_invalid"].append(f"{kind}: {why}")
                if outcomes is not None:
                    outcomes.append((kind, "accepted_invalid" if why else "accepted", (why or "")[:160]))
    finally:
        signal.signal(signal.SIGALRM, old)
        if tmp:
            tmp.cleanup()
    return stats


def test_fuzzed_configs_fail_cleanly_or_are_valid(tmp_path):
    stats = run_fuzz(root=tmp_path, n=4000, seed=0)
    ex = stats["examples"]
    assert stats["tracebacks"] == 0, ex["tracebacks"][:10]
    assert stats["bad_messages"] == 0, ex["bad_messages"][:10]
    assert stats["accepted_invalid"] == 0, ex["accepted_invalid"][:10]
    assert stats["cases"] > 4000 and stats["clean"] > 1000 and stats["accepted"] > 300, stats


INVALID = [("train", "lr", INF), ("train", "lr", NAN), ("train", "lr", -1e-4), ("train", "grad_clip", NAN),
           ("train", "grad_clip", -1.0), ("train", "grad_clip", 0.0), ("train", "grad_clip", INF),
           ("train", "weight_decay", -0.1), ("train", "weight_decay", NAN), ("sampling", "guidance_scale", -1.0),
           ("sampling", "guidance_scale", NAN), ("sampling", "guidance_scale", INF),
           ("sampling", "eval_guidance_scale", -2.0), ("model", "lora_dropout", 1.5), ("model", "lora_dropout", 1.0),
           ("model", "lora_dropout", -0.1), ("model", "lora_alpha", -8.0), ("model", "lora_alpha", INF),
           ("advantage", "clip", INF), ("advantage", "clip", NAN), ("advantage", "eps", NAN),
           ("train", "iterations", 2.5), ("train", "iterations", True), ("sampling", "num_steps", 10.0),
           ("train", "seed", -1), ("train", "seed", 2**64), ("crd", "kl_guidance_scale", INF),
           ("nft", "beta", INF), ("distill", "fake_lr", NAN), ("backprop", "lambda_kl", -INF),
           ("train", "eval_every", -1), ("grpo", "kl_reward", NAN), ("opd", "alpha", NAN)]


@pytest.mark.parametrize("section,key,value", INVALID, ids=[f"{s}.{k}={v!r}" for s, k, v in INVALID])
def test_invalid_values_are_rejected_naming_the_key(section, key, value):
    for build in (lambda: C.config_from_dict({section: {key: value}}),
                  lambda: C.with_overrides(C.Config(), {f"{section}.{key}": value}),
                  lambda: C._SECTION_CLASSES[section](**{key: value})):
        with pytest.raises(ValueError) as err:
            build()
        msg = str(err.value)
        assert f"{section}.{key}" in msg and "\n" not in msg and len(msg) <= 300, msg


@pytest.mark.parametrize("item", ["train.lr=.inf", "train.grad_clip=.nan", "train.grad_clip=-1",
                                  "sampling.guidance_scale=-1", "sampling.guidance_scale=.nan",
                                  "model.lora_dropout=1.5", "train.weight_decay=-0.1", "advantage.clip=.inf",
                                  "train.lr=1e400", "opd.teachers.t.guidance_scale=.nan"])
def test_bad_overrides_fail_in_load_config(item):
    shipped = "configs/toy_opd.yaml" if item.startswith("opd") else "configs/toy_grpo.yaml"
    extra = ["opd.teachers.t.lora=x"] if item.startswith("opd") else []
    with pytest.raises(ValueError) as err:
        C.load_config(shipped, extra + [item])
    msg = str(err.value)
    key = item.split("=")[0]
    assert msg.startswith(os.path.basename(shipped) + ": ") and key in msg and len(msg) <= 300, msg


def test_valid_edge_values_still_pass(tmp_path):
    cfg = C.config_from_dict({"sampling": {"guidance_scale": 0, "eval_guidance_scale": 1.0},
                              "model": {"lora_dropout": 0.0, "lora_alpha": 8, "path": tmp_path},
                              "train": {"lr": np.float32(1e-3), "iterations": np.int64(3), "weight_decay": 0,
                                        "grad_clip": 0.5, "seed": 2**63 - 1, "ema_decay": 0.999}})
    assert cfg.sampling.guidance_scale == 0.0 and isinstance(cfg.sampling.guidance_scale, float)
    assert cfg.train.iterations == 3 and type(cfg.train.iterations) is int and type(cfg.train.lr) is float
    assert cfg.model.path == str(tmp_path) and cfg.model.lora_alpha == 8.0
    assert C.TrainConfig(lr=1).lr == 1.0 and C.SamplingConfig(sde_window=(0, 2)).sde_window == (0, 2)


def test_deep_yaml_is_one_line_from_the_cli(tmp_path, capsys):
    from flowalign.cli import main

    for text in ("[" * 5000 + "]" * 5000, "train: {reward_options: " + "{a: " * 500 + "1" + "}" * 501 + "\n"):
        path = tmp_path / "deep.yaml"
        path.write_text(text)
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flowalign: error: deep.yaml: ") and "nested more than" in err, err[:300]
        assert len(err.splitlines()) == 1 and len(err) <= 320
    assert main(["train", "configs/toy_grpo.yaml", "train.reward_options=" + "[" * 3000 + "]" * 3000]) == 2
    assert "nested more than" in capsys.readouterr().err


def test_prompt_files_never_echo_their_lines(tmp_path):
    files = _files(tmp_path)
    for path in files["prompt_files"]:
        try:
            prompts = P.read_prompt_file(path)
        except (ValueError, FileNotFoundError) as err:
            msg = str(err)
            assert SECRET not in msg and "\n" not in msg and len(msg) <= 300, msg
        else:  # a text file of short lines is prompts, whatever it holds (the reward decides what it can score)
            assert path.endswith(("passwd", "good.txt")) and prompts, path
    assert P.read_prompt_file(str(tmp_path / "good.txt")) == ["a photo of a cat", "a photo of a dog", "third"]
    with pytest.raises(ValueError, match=r"mb_line.txt' line 2 is longer than 10000 characters"):
        P.read_prompt_file(files["mb_line"])
    with pytest.raises(ValueError, match=r"is not UTF-8 text \(byte 5\)"):
        P.read_prompt_file(files["binary"])
