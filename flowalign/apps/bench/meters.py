"""What the benchmark measures around the networks: denoiser / VAE / text-encoder calls, rows and times per
phase (``NetworkMeter``), the resident memory (``MemorySampler``) and the machine (``machine_info``)."""

from __future__ import annotations

import os
import platform
import resource
import threading
import time
from typing import Optional, Sequence

import torch

from ...runtime.machine import REPO_ROOT, describe_machine, machine_info  # noqa: F401 (the bench's names for them)


# ---- measuring ----------------------------------------------------------------------------------------


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """The batch tensor of a denoiser call: the first positional tensor, else hidden_states / sample."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    for key in ("hidden_states", "sample", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _output_tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _output_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _output_tensors(o)]
    sample = getattr(out, "sample", None)  # diffusers output dataclasses
    return [sample] if isinstance(sample, torch.Tensor) else []


class NetworkMeter:
    """Counts and times the pipeline's networks with hooks, bucketed by ``phase`` (set by the caller).

    ``take()`` returns the totals since the last ``take()`` and resets them:
    ``{"<net>_calls/<phase>": n, "<net>_rows/<phase>": rows, "<net>_s/<phase>": seconds}`` for net in
    ``denoiser`` (forward), ``vae`` (decoder forward), ``text`` (all text encoders), plus
    ``denoiser_bwd_s/<phase>`` and ``denoiser_grad_calls/<phase>`` (forwards that built a graph).
    See the module docstring for what each time includes. Use as a context manager (hooks removed on exit).
    """

    def __init__(self, adapter, params: Sequence[torch.nn.Parameter]):
        self.adapter = adapter
        self.params = [p for p in params if p.requires_grad]
        self.phase = "reward"
        self._cuda = adapter.device.type == "cuda"
        self._handles: list = []
        self._open = None  # [phase, start, end] of the backward window in progress
        self._starts: dict = {}
        self.totals: dict = {}

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _add(self, key: str, value: float) -> None:
        k = f"{key}/{self.phase}" if "/" not in key else key
        self.totals[k] = self.totals.get(k, 0) + value

    def _mark(self):
        """A point in time: perf_counter on CPU; on CUDA an event on the stream (no synchronize per parameter)."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _close_backward(self) -> None:
        if self._open is not None:
            phase, start, end = self._open
            if end is not None:
                if self._cuda:
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1000
                else:
                    seconds = end - start
                self._add(f"denoiser_bwd_s/{phase}", max(seconds, 0.0))
            self._open = None

    # hooks
    def _pre(self, name: str):
        def hook(module, args, kwargs):
            if name == "denoiser":
                self._close_backward()
            self._starts[id(module)] = self._now()
            if name != "text":
                x = _first_tensor(args, kwargs)
                self._add(f"{name}_rows", int(x.shape[0]) if x is not None and x.dim() else 0)
            self._add(f"{name}_calls", 1)
        return hook

    def _post(self, name: str):
        def hook(module, args, kwargs, out):
            self._add(f"{name}_s", self._now() - self._starts.pop(id(module)))
            if name == "denoiser" and torch.is_grad_enabled():
                outs = [t for t in _output_tensors(out) if t.requires_grad]
                if outs:
                    self._add("denoiser_grad_calls", 1)
                    for t in outs:
                        t.register_hook(self._backward_start)
        return hook

    def _backward_start(self, grad):
        if self._open is None:
            self._open = [self.phase, self._mark(), None]
        return grad

    def _backward_param(self, param):
        if self._open is not None:
            self._open[2] = self._mark()

    def __enter__(self) -> "NetworkMeter":
        pipe = self.adapter.pipe
        vae = getattr(pipe, "vae", None)
        modules = [("denoiser", den) for den in self.adapter.denoisers]  # both experts of Wan 2.2 count
        if vae is not None:
            modules.append(("vae", getattr(vae, "decoder", vae)))
        for attr in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if isinstance(getattr(pipe, attr, None), torch.nn.Module):
                modules.append(("text", getattr(pipe, attr)))
        for name, m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._post(name), with_kwargs=True))
        for p in self.params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._backward_param))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def take(self) -> dict:
        self._close_backward()
        out, self.totals = self.totals, {}
        return out


class MemorySampler:
    """Peak resident set size (bytes) of this process, sampled every ``interval`` s in a thread while active.

    ``peak`` / ``start``: the highest and the first reading; 0 where /proc/self/statm does not exist."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> "MemorySampler":
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def ru_maxrss_bytes() -> int:
    """The process's peak RSS so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if platform.system() == "Darwin" else peak * 1024)
