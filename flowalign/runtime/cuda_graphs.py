"""``model.cuda_graphs``: the denoiser's gradient-free calls replayed from CUDA graphs.

A rollout is ``num_steps`` x (1 or 2 CFG branches) denoiser forwards of one fixed shape under ``torch.no_grad``.
At small batch sizes each forward is launch-bound (hundreds of small kernels); a CUDA graph records the launches
once and replays them with one call. The route diffusers documents for this is ``torch.compile(mode=
"reduce-overhead")``: inductor compiles the forward and its CUDA-graph trees record one graph per input shape
(and per guarded state, e.g. the LoRA on or off), then replay it.

Only calls without autograd take that route: the rollout, the reference / old-policy passes the algorithms make
under ``torch.no_grad``, held-out evaluation. Training forwards (grad enabled) run eagerly, or compiled in
torch.compile's default mode with ``model.compile`` as well (no graphs: their activations must outlive the call).

Two facts make this exact for training rather than a stale copy of the policy:
- a recorded graph reads the parameters at their addresses; the optimizer, the EMA swap and the old-policy
  snapshot all update LoRA weights in place (``p.copy_``, AdamW), so each replay sees the current weights;
- a replay's output lives in the graph's memory pool and the next replay overwrites it, so each output is cloned
  before the sampler keeps it (one latent-sized copy per call).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils import _pytree as pytree

GRAPH_MODE = "reduce-overhead"  # torch.compile's mode that records CUDA graphs (cudagraph trees)


def _cloned(out: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def graph_no_grad_calls(module: torch.nn.Module, compile_training: bool = False,
                        compile_fn: Callable = torch.compile) -> None:
    """Route ``module``'s forward in place: gradient-free calls -> ``compile_fn(forward, mode="reduce-overhead")``
    (output cloned; ``torch.compiler.cudagraph_mark_step_begin()`` before each call, so the previous replay's
    buffers may be reused), calls with grad -> the eager forward, or ``compile_fn(forward)`` with
    ``compile_training``. The module object, its hooks, LoRA layers and parameters stay the same; its class's
    ``forward`` is kept as ``module.eager_forward``. A module routed already is left as it is (a LoRA removed and
    added again, e.g. after ``flowalign doctor`` on the same adapter, is new parameters: torch.compile's guards
    recompile for them). ``compile_fn`` is for tests (a recorder instead of inductor)."""
    if getattr(module, "eager_forward", None) is not None:
        return
    eager = module.forward  # the bound class forward
    graphed = compile_fn(eager, mode=GRAPH_MODE)
    trained = compile_fn(eager) if compile_training else eager

    def forward(*args, **kwargs):
        if torch.is_grad_enabled() or not module.replay_no_grad:
            return trained(*args, **kwargs)
        torch.compiler.cudagraph_mark_step_begin()
        return _cloned(graphed(*args, **kwargs))

    module.eager_forward = eager
    module.replay_no_grad = True
    module.forward = forward


@contextmanager
def training_route(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Gradient-free calls of routed ``modules`` take the training route for the block (a module not routed is
    unaffected): ``flowalign doctor`` re-scores a rollout without autograd but must price what the update sees,
    the graphed rollout against the eager (or default-compiled) training forward."""
    routed = [m for m in modules if getattr(m, "replay_no_grad", None) is not None]
    before = [m.replay_no_grad for m in routed]
    for m in routed:
        m.replay_no_grad = False
    try:
        yield
    finally:
        for m, b in zip(routed, before):
            m.replay_no_grad = b


def check_cuda_graphs(device: torch.device, sharded: bool) -> None:
    """The one-line refusals of ``model.cuda_graphs``: a denoiser not on CUDA, or FSDP shards (their all-gathers
    run in hooks around each block, outside what a graph can record)."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"model.cuda_graphs replays CUDA graphs but the denoiser is on {device}: drop it there "
                         "(model.compile=true is the CPU's compiled path)")
    if sharded:
        raise ValueError("model.cuda_graphs cannot record FSDP-sharded denoisers (train.shard=fsdp): use one of them")
