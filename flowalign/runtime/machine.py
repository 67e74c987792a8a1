"""What a result was measured on: the machine (CPU model, cores, memory, GPU), the library versions and the git
commit, for every figure a report quotes (bench, doctor)."""

from __future__ import annotations

import os
import platform

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def machine_info() -> dict:
    """CPU model, cores, memory, GPU, library versions and git commit: what a result was measured on."""
    import diffusers
    import peft

    cpu = platform.processor() or platform.machine()
    mem = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal")), None)
    except OSError:
        pass
    commit = None
    try:
        import subprocess

        commit = subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "torch_threads": torch.get_num_threads(),
            "memory_gb": round(mem / 2**30, 1) if mem else None, "gpu": gpu,
            "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpu else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "flowalign_commit": commit}


def describe_machine(m: dict) -> str:
    """One line, e.g. '2-core Intel Xeon ..., 8 GB RAM, no GPU; torch 2.13.0, 1 thread'."""
    gpu = f"{m['gpu']} ({m['gpu_memory_gb']} GB)" if m.get("gpu") else "no GPU"
    mem = f", {m['memory_gb']} GB RAM" if m.get("memory_gb") else ""
    return (f"{m['cores']}-core {m['cpu']}{mem}, {gpu}; torch {m['torch']}, {m['torch_threads']} "
            f"thread{'s' if m['torch_threads'] != 1 else ''}")
