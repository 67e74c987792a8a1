"""Bad input to `flowalign train` is one line `flowalign: error: ...` (exit code 2, no traceback): a missing model,
an empty or binary prompt file, an OCR prompt without quoted text, a reward server that is down, a logger package
that is not installed."""

import os
import socket
import sys

import pytest

from flowalign.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["sampling.num_steps=2", "sampling.sde_window=null", "train.iterations=1", "train.prompts_per_iter=1",
         "train.group_size=2", "train.eval_per_task=1", "model.lora_rank=2"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_line(capsys, args) -> str:
    assert main(["train", os.path.join(ROOT, "configs", "toy_grpo.yaml"), *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("flowalign: error: "), err
    return last


def test_missing_model_path(tmp_path, capsys):
    line = _error_line(capsys, [f"model.path={tmp_path / 'no-such-model'}", f"train.out_dir={tmp_path / 'out'}"])
    assert "no-such-model' not found locally" in line and "pass a local folder" in line


@pytest.mark.parametrize("content,needle", [(b"\n  \n", "has no prompts: write one prompt per line"),
                                            (b"\xff\xfe\x00a\x00", "is not UTF-8 text (byte 0)")])
def test_empty_or_binary_prompt_file(tmp_path, tiny_pipe_dir, capsys, content, needle):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(content)
    line = _error_line(capsys, [f"model.path={tiny_pipe_dir}", f"train.out_dir={tmp_path / 'out'}",
                                f"train.prompts={prompts}"])
    assert f"prompt file '{prompts}' {needle}" in line


def test_ocr_prompt_without_quoted_text(tmp_path, tiny_pipe_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sign that says OPEN\n")
    line = _error_line(capsys, [f"model.path={tiny_pipe_dir}", f"train.out_dir={tmp_path / 'out'}", "train.reward=ocr",
                                f"train.prompts={prompts}"])
    assert 'has no "quoted text"; write the target text in double quotes' in line


def test_reward_server_down(tmp_path, tiny_pipe_dir, capsys):
    url = f"http://127.0.0.1:{_free_port()}/score"
    line = _error_line(capsys, [f"model.path={tiny_pipe_dir}", f"train.out_dir={tmp_path / 'out'}",
                                "train.reward=remote",
                                f"train.reward_options={{url: '{url}', retries: 1, backoff: 0}}"])
    assert f"reward server {url} unreachable after 1 tries: start it or fix `url`" in line


def test_missing_logger_package_names_the_install(tmp_path, tiny_pipe_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    line = _error_line(capsys, [f"model.path={tiny_pipe_dir}", f"train.out_dir={tmp_path / 'out'}",
                                "train.log_with=[wandb]"])
    assert "train.log_with=wandb needs the wandb package: pip install wandb" in line
