"""MetricsLog: metrics.jsonl and metrics.csv hold the same rows (CSV columns = union of keys), truncation for a
resumed run, a torn last line skipped, and the tensorboard / wandb loggers fed numeric values (fake modules)."""

import csv
import json
import sys
import types

import pytest

from flowalign.runtime import metrics
from flowalign.runtime.metrics import MetricsLog


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_jsonl_and_csv_hold_the_same_rows(tmp_path):
    log = MetricsLog(str(tmp_path))
    log.log({"iteration": 1, "loss": 0.5, "reward_mean": None})
    log.log({"iteration": 2, "loss": 0.25, "per_step": [1.0, 2.0]})  # a new column rewrites the CSV
    log.log({"iteration": 3, "loss": float("nan")})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    table = _csv(tmp_path / "metrics.csv")
    assert list(table[0]) == ["iteration", "loss", "reward_mean", "per_step"]
    assert [(r["iteration"], r["loss"], r["reward_mean"], r["per_step"]) for r in table] == [
        ("1", "0.5", "", ""), ("2", "0.25", "", "[1.0, 2.0]"), ("3", "nan", "", "")]

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')  # killed mid-write
    with pytest.warns(RuntimeWarning, match="line 4 is not JSON"):
        again = MetricsLog(str(tmp_path))
    again.log({"iteration": 4, "loss": 1.0})  # a reopened log keeps the earlier rows and columns
    table = _csv(tmp_path / "metrics.csv")
    assert [r["iteration"] for r in table] == ["1", "2", "3", "4"] and table[1]["per_step"] == "[1.0, 2.0]"
    again.truncate(2)
    assert [r["iteration"] for r in again.rows] == [1, 2]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2
    assert [r["iteration"] for r in _csv(tmp_path / "metrics.csv")] == ["1", "2"]


def test_tensorboard_and_wandb_get_numeric_values(tmp_path, monkeypatch):
    calls = []

    class Writer:
        def __init__(self, log_dir, purge_step):
            calls.append(("tb", log_dir, purge_step))

        def add_scalar(self, k, v, step):
            calls.append(("scalar", k, v, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("tb_close",))

    class Run:
        def log(self, values, step):
            calls.append(("wandb", values, step))

        def finish(self):
            calls.append(("wandb_finish",))

    def init(**kw):
        calls.append(("init", kw["mode"], kw["id"], kw["resume"], kw["dir"]))
        return Run()

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(
        init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123")))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log = MetricsLog(str(tmp_path), ["tensorboard", "wandb"], config={"train": {"lr": 1.0}})
    log.log({"iteration": 3, "loss": 0.5, "note": "x", "per_step": [1], "ok": True})
    log.close()
    assert calls[0] == ("tb", str(tmp_path / "tensorboard"), 3)  # a resumed run purges the events from here
    assert calls[1] == ("init", "offline", "abc123", "allow", str(tmp_path))
    assert ("scalar", "loss", 0.5, 3) in calls and not any(c[0] == "scalar" and c[1] == "note" for c in calls)
    assert ("wandb", {"iteration": 3.0, "loss": 0.5, "ok": 1.0}, 3) in calls
    assert (tmp_path / "wandb_run_id").read_text() == "abc123"  # a resumed run continues the same wandb run
    assert ("tb_close",) in calls and ("wandb_finish",) in calls


def test_missing_tensorboard_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="train.log_with=tensorboard needs the tensorboard package: pip install "
                                          "tensorboard"):
        metrics.MetricsLog("unused", ["tensorboard"])
