"""Per-iteration metrics on disk and, optionally, in tensorboard / wandb.

``MetricsLog(out_dir, log_with)`` writes every row to ``metrics.jsonl`` (one JSON object a line, the source of
truth) and ``metrics.csv`` (the same rows, columns = the union of keys in first-seen order; lists as JSON, None
empty), and sends the numeric values to the loggers named in ``train.log_with``:

* ``tensorboard``: ``out_dir/tensorboard`` (``pip install tensorboard``; view with ``tensorboard --logdir``);
  a resumed run purges the events after its checkpoint.
* ``wandb``: project ``flowalign``, files under ``out_dir/wandb``; offline unless ``WANDB_MODE`` says otherwise
  or ``WANDB_API_KEY`` is set (sync later with ``wandb sync``). The run id is kept in ``out_dir/wandb_run_id``
  so a resumed run continues the same wandb run.

Both are imported when the log opens (not at import time); a missing one fails at once with the pip command.
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from typing import Optional, Sequence

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
EVALS_JSONL = "evals.jsonl"
INSTALL_HINTS = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}


def remove_logs(out_dir: str) -> None:
    """Delete a previous run's metrics.jsonl, metrics.csv and evals.jsonl in ``out_dir`` (a fresh run owns its
    logs; checkpoints are flowalign.runtime.checkpoint's business)."""
    for name in (METRICS_JSONL, METRICS_CSV, EVALS_JSONL):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def parse_jsonl(path: str, errors: str = "strict") -> tuple[list, list[int]]:
    """(the JSON values of a .jsonl file's non-blank lines, the numbers of the lines that are not JSON: a torn last
    line of a run killed, or still, writing); ([], []) when missing. ``errors``: ``open``'s decoding errors."""
    if not os.path.isfile(path):
        return [], []
    rows, bad = [], []
    with open(path, encoding="utf-8", errors=errors) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(n)
    return rows, bad


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a .jsonl file ([] when missing); a torn line (a run killed mid-write) is skipped with a
    warning."""
    rows, bad = parse_jsonl(path)
    for n in bad:
        warnings.warn(f"{path}: line {n} is not JSON (a run killed while writing?); skipped", RuntimeWarning)
    return rows


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    """Replace ``path`` with ``rows``, one JSON object a line (written to a temporary file, then renamed)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def scalars(row: dict) -> dict[str, float]:
    """The numeric (int/float/bool) values of a metrics row, as floats."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}


def _columns(rows: Sequence[dict]) -> list[str]:
    """The union of the rows' keys in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return repr(v) if isinstance(v, float) and math.isfinite(v) else str(v)


class MetricsLog:
    """Rows of per-iteration metrics (each with an ``iteration`` key) -> metrics.jsonl, metrics.csv, loggers.

    Rows already in ``out_dir/metrics.jsonl`` are kept (``rows``) and new ones appended; ``truncate(it)`` drops
    rows after iteration ``it`` (a resumed run). ``config``: the run's settings for wandb. ``write=False`` (the
    non-main processes of a distributed run) keeps the rows in memory only: no files, no loggers.
    """

    def __init__(self, out_dir: str, log_with: Sequence[str] = (), config: Optional[dict] = None,
                 write: bool = True):
        self.out_dir, self.write = out_dir, write
        self.jsonl = os.path.join(out_dir, METRICS_JSONL)
        self.csv = os.path.join(out_dir, METRICS_CSV)
        self.config = config
        self.rows = read_jsonl(self.jsonl)
        self.columns = _columns(self.rows)
        self.modules = {name: _import_logger(name) for name in log_with} if write else {}
        self.writers: dict = {}  # opened at the first row (tensorboard's purge step is that row's iteration)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        new = [k for k in row if k not in self.columns]
        if new or not os.path.isfile(self.csv):
            self.columns += new
            self._write_csv()
        else:
            with open(self.csv, "a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow([_cell(row.get(k)) for k in self.columns])
        self._send(row)

    def truncate(self, iteration: int) -> None:
        """Keep the rows up to ``iteration`` (a checkpoint's) in both files; later ones are dropped."""
        self.rows = [r for r in self.rows if r.get("iteration", 0) <= iteration]
        if not self.write:
            return
        write_jsonl(self.jsonl, self.rows)
        self.columns = _columns(self.rows)
        self._write_csv()

    def _write_csv(self) -> None:
        with open(self.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(self.columns)
            w.writerows([_cell(r.get(k)) for k in self.columns] for r in self.rows)

    def _send(self, row: dict) -> None:
        if not self.modules:
            return
        step = int(row.get("iteration", len(self.rows)))
        if not self.writers:
            self.writers = {name: _open_logger(name, mod, self.out_dir, step, self.config)
                            for name, mod in self.modules.items()}
        values = scalars(row)
        if "tensorboard" in self.writers:
            for k, v in values.items():
                self.writers["tensorboard"].add_scalar(k, v, step)
            self.writers["tensorboard"].flush()
        if "wandb" in self.writers:
            self.writers["wandb"].log(values, step=step)

    def close(self) -> None:
        for name, w in self.writers.items():
            w.close() if name == "tensorboard" else w.finish()
        self.writers = {}


def _import_logger(name: str):
    """The module behind a logger name; ImportError with the pip command when it is not installed."""
    try:
        if name == "tensorboard":
            from torch.utils import tensorboard

            return tensorboard
        if name == "wandb":
            import wandb

            return wandb
    except ImportError:
        raise ImportError(f"train.log_with={name} needs the {name} package: {INSTALL_HINTS[name]} "
                          f"(or drop {name} from train.log_with)") from None
    raise ValueError(f"unknown logger {name!r}; choose from {', '.join(INSTALL_HINTS)}")


def _open_logger(name: str, module, out_dir: str, first_step: int, config: Optional[dict]):
    if name == "tensorboard":
        return module.SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"), purge_step=first_step)
    id_file = os.path.join(out_dir, "wandb_run_id")
    run_id = open(id_file).read().strip() if os.path.isfile(id_file) else module.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return module.init(project=os.environ.get("WANDB_PROJECT", "flowalign"), dir=out_dir, id=run_id, resume="allow",
                       mode=mode, config=config)
