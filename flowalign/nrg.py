"""Flow-NRG: reward guidance on the noisy latents of a flow pipeline, with per-objective weights chosen at
inference (VideoAlign, "Improving Video Generation with Human Feedback", arXiv 2501.13918; docs/nrg.md).

At every denoising step, with the rectified-flow conventions of docs/math.md §0 (``x_t = (1-t) x0 + t eps``,
velocity ``v ~ eps - x0``, Euler step ``x' = x - (t - t') v``), the denoiser's velocity is replaced by

    x0_hat = x_t - t v                                              [B, C, h, w]   (v held constant: stop-gradient)
    g      = sum_j w_j grad_{x_t} R_j(decode(x0_hat), prompts)     [B, C, h, w]   (= sum_j w_j grad_{x0_hat} R_j)
    v     <- v - g

so the Euler step ``x' = x - Delta v + Delta g`` climbs the weighted reward. w_j = 0 switches objective j off; all
weights 0 is the unguided pipeline bit for bit (nothing is computed). Negative weights push away from a reward.

What is [assumed] here (and in docs/nrg.md):
- the paper trains its reward model on NOISY latents, ``R(x_t, t)``, so the guidance never decodes; offline we have
  no such model, and the stand-in is a differentiable image reward on the decoded one-step prediction
  ``R(decode(x0_hat))``. v is held constant (``x0_hat`` depends on x_t with Jacobian I), as the gradient of a latent
  reward model of x_t never passes through the generator either; so g is the reward gradient at x0_hat.
- the step weight: the exact score of the tilted marginal ``p_t exp(w R)`` would change v by ``-w t/(1-t) grad R``
  (``v = -(x + t s)/(1-t)``), infinite at t = 1; like docs/math.md §11 we use one constant weight per objective
  (the time factor absorbed into w). The paper's exact scaling was not checked against its text.

Two ways in, one math function (:func:`guidance`):
- :func:`enable_nrg` on a diffusers pipeline: ``pipe(...)`` runs unmodified (callbacks, output types, batching and
  CFG keep working). Supported: StableDiffusion3Pipeline (the shipped ``flowalign.asset("toy-sd3")``); other families
  raise one line pointing to the second way. A forward hook on ``pipe.transformer`` reads the call's
  ``hidden_states`` (x_t) and ``timestep`` (``t = timestep / scheduler.config.num_train_timesteps``), forms x0_hat
  from the CFG-combined velocity (SD3 batches [uncond; cond] rows; the pipeline's ``guidance_scale``), computes g
  under ``torch.enable_grad()`` (the pipeline itself runs under no_grad) and subtracts it from BOTH CFG halves, so
  the pipeline's own CFG gives ``v_cfg - g``. The prompts come from the pipeline's ``encode_prompt`` (wrapped on
  the instance while NRG is on; ``disable_nrg`` restores it). A second call at the same step and latents (SD3's
  skip-layer guidance) reuses g (it cancels in that term's difference anyway).
- :func:`guided` on a flowalign adapter (any flow family: FLUX, Wan, ... whose adapters keep latents unpacked):
  a wrapper whose ``predict`` returns ``v - g``, for ``flowalign.rollout.rollout`` or any loop of your own.

With RL Guidance (flowalign.rlg). Both may be on at once: NRG acts on the denoiser's FINAL output, i.e. on the
RLG mix ``v_ref + w (v_theta - v_ref)``, whichever was enabled first (when ``enable_rlg`` comes after
``enable_nrg``, NRG's output hook is moved behind RLG's at the next call), and the nested reference call RLG makes
is not guided. So RLG scale 1 with all NRG weights 0 is the plain LoRA pipeline, bit for bit.
Not for concurrent calls of one pipeline from several threads.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .rlg import _first_tensor, _replace_first

_ATTR = "_flowalign_nrg"
PIPELINE_FAMILIES = ("sd3",)  # families whose pipe(...) enable_nrg supports


@dataclass
class NRGTerm:
    """One objective: its name, the reward (``differentiable`` True) and the weight w_j."""

    name: str
    reward: object
    weight: float


RewardsLike = Union[Mapping[str, float], Sequence]


def _weight(name: str, w) -> float:
    try:
        w = float(w)
    except (TypeError, ValueError):
        raise ValueError(f"NRG weight of {name!r} must be a number, got {w!r}") from None
    if not math.isfinite(w):
        raise ValueError(f"NRG weight of {name!r} must be a finite number, got {w}")
    return w


def _not_differentiable(name: str) -> ValueError:
    from .rewards import differentiable_rewards

    return ValueError(f"NRG needs a differentiable reward (its gradient guides the latents): {name!r} is not "
                      f"differentiable in torch; differentiable rewards: {', '.join(differentiable_rewards())}")


def resolve_rewards(rewards: RewardsLike, reward_options: Optional[Mapping[str, Mapping]] = None) -> list[NRGTerm]:
    """``{"clip_score": 2.0, ...}`` or ``[(Reward or name, weight), ...]`` -> [NRGTerm], every reward differentiable.

    Names are built with ``flowalign.rewards.get(name, **reward_options.get(name, {}))`` (e.g.
    ``reward_options={"clip_score": {"model": "tiny"}}`` for the shipped tiny CLIP). A non-differentiable reward
    (ocr, toy_geneval, jpeg_*) is a ValueError naming it and listing the differentiable ones, raised before
    anything is built; so are unknown names, non-finite weights and a reward given twice."""
    from . import rewards as rewards_pkg

    options = dict(reward_options or {})
    pairs = list(rewards.items()) if isinstance(rewards, Mapping) else list(rewards)
    if not pairs:
        raise ValueError("NRG needs at least one reward: rewards={'clip_score': 2.0} or [(reward, weight)]")
    checked = []
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"NRG rewards: expected (reward, weight) pairs, got {pair!r}")
        reward, w = pair
        name = reward if isinstance(reward, str) else getattr(reward, "name", type(reward).__name__)
        if isinstance(reward, str):
            if reward not in rewards_pkg.REWARDS:
                raise ValueError(f"unknown reward {reward!r}; differentiable rewards for NRG: "
                                 f"{', '.join(rewards_pkg.differentiable_rewards())}")
            flag = getattr(rewards_pkg.REWARDS[reward], "differentiable", False)
            if flag is not True and not isinstance(flag, property):  # multi: decided by its parts once built
                raise _not_differentiable(reward)
        elif not callable(getattr(reward, "score_differentiable", None)):
            raise ValueError(f"NRG rewards: {reward!r} is neither a reward name nor a flowalign Reward")
        checked.append((name, reward, _weight(name, w)))
    names = [n for n, _, _ in checked]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"NRG: reward {twice[0]!r} is given twice; give each objective once with its weight")
    unused = sorted(set(options) - set(names))
    if unused:
        raise ValueError(f"NRG: options for {unused[0]!r}, which is not one of the rewards ({', '.join(names)})")
    terms = []
    for name, reward, w in checked:
        if isinstance(reward, str):
            reward = rewards_pkg.get(reward, **dict(options.get(name, {})))
        if getattr(reward, "differentiable", False) is not True:
            raise _not_differentiable(name)
        terms.append(NRGTerm(name, reward, w))
    return terms


def _sigma_like(sigma, x: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        return s
    return s.reshape(-1, *([1] * (x.dim() - 1)))


def guidance(x: torch.Tensor, v: torch.Tensor, sigma, terms: Sequence[NRGTerm], decode: Callable,
             prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
    """The Flow-NRG guidance term ``g = sum_j w_j grad_{x_t} R_j(decode(x_t - sigma v))`` with v held constant.

    Args:
        x: x_t [B, ...] (any float dtype); v: the velocity at (x_t, t) [B, ...] (after CFG); sigma: t, a float or [B].
        terms: the objectives (:func:`resolve_rewards`); weight-0 terms are skipped.
        decode: latents [B, ...] -> images [B, 3, H, W] (video [B, F, 3, H, W]) in [0, 1], differentiable (e.g. a
            flowalign adapter's ``decode``).
        prompts / metadata: one per row, passed to each ``reward.score_differentiable``.
    Returns: g, float32, shape of x (zeros when every weight is 0). Rows are independent (the rewards score per
    image), so ``grad`` of the batch sum gives each row its own gradient. Runs with gradients on even inside
    ``torch.no_grad()`` / ``torch.inference_mode()``; the rewards' and the VAE's weights get no ``.grad``.
    """
    active = [t for t in terms if t.weight != 0]
    if len(prompts) != x.shape[0]:
        raise ValueError(f"NRG: {x.shape[0]} latents but {len(prompts)} prompts")
    with torch.inference_mode(False), torch.enable_grad():
        x0_hat = x.detach().float() - _sigma_like(sigma, x) * v.detach().float()
        z = x0_hat.clone().requires_grad_(True)  # a normal tensor even when x came from inference mode
        if not active:
            return torch.zeros_like(z, requires_grad=False)
        images = decode(z)
        total = 0.0
        for term in active:
            scores = term.reward.score_differentiable(images, list(prompts), metadata)
            total = total + term.weight * scores.float().sum()
        (g,) = torch.autograd.grad(total, z)
    return g.detach()


def guided_velocity(x, v, sigma, terms, decode, prompts, metadata=None) -> torch.Tensor:
    """``v - guidance(x, v, sigma, ...)`` in float32: the Flow-NRG velocity."""
    return v.float() - guidance(x, v, sigma, terms, decode, prompts, metadata)


# ---- the pipeline path ------------------------------------------------------------------------------------------
@dataclass
class _NRGState:
    """Per-pipeline NRG settings and hooks (stored on the pipeline as ``_flowalign_nrg``)."""

    terms: list
    decode: Callable
    pipe: Callable  # weakref to the pipeline (its guidance scale, its scheduler, and RLG's hooks)
    num_train_timesteps: float
    handles: list = field(default_factory=list)
    post_handle: object = None
    post_hook: Optional[Callable] = None
    prompts: Optional[list] = None  # the last pipe(...) call's prompts, one per image (from encode_prompt)
    calls: list = field(default_factory=list)  # per denoiser call in flight: True = outermost (guided)
    cache: Optional[tuple] = None  # (timestep, x [B, ...], g): a second call at the same step of one pipe(...) reuses g

    @property
    def weights(self) -> dict:
        return {t.name: t.weight for t in self.terms}


def _family(pipe) -> Optional[str]:
    from .models.registry import detect_family

    try:
        return detect_family(type(pipe).__name__, [c.__name__ for c in type(pipe).__mro__])
    except ValueError:
        return None


def _record_prompts(state: _NRGState, original: Callable) -> Callable:
    """``encode_prompt`` that records the call's prompts, each repeated ``num_images_per_prompt`` times (the row
    order diffusers gives the images), then runs the original."""
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        signature = None

    def encode_prompt(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments if signature is not None else dict(kwargs)
        prompt, n = bound.get("prompt"), int(bound.get("num_images_per_prompt", 1) or 1)
        state.cache = None  # a new pipe(...) call: g is reused only within one call
        state.calls.clear()  # and no bookkeeping left from a call that raised (torch may skip our output hook then)
        if prompt is None:
            state.prompts = None  # prompt_embeds given: the text is unknown
        else:
            state.prompts = [p for p in ([prompt] if isinstance(prompt, str) else list(prompt)) for _ in range(n)]
        return original(*args, **kwargs)

    encode_prompt._flowalign_nrg_original = original
    return encode_prompt


def _rlg_is_later(pipe, state: _NRGState) -> bool:
    """True when RLG's output hooks were registered after NRG's (enable_rlg after enable_nrg)."""
    rlg = getattr(pipe, "_flowalign_rlg", None)
    if rlg is None or not rlg.handles:
        return False
    return max(h.id for h in rlg.handles) > state.post_handle.id


def _make_hooks(state: _NRGState):
    def pre_hook(mod, args, kwargs):
        outermost = not state.calls
        state.calls.append(outermost)
        if outermost:
            pipe = state.pipe()
            if pipe is not None and _rlg_is_later(pipe, state):
                # enable_rlg came after enable_nrg: move NRG's output hook behind RLG's (the output hooks run after
                # forward, in registration order, so the re-registered one runs last in this very call)
                state.post_handle.remove()
                state.post_handle = mod.register_forward_hook(state.post_hook, with_kwargs=True, always_call=True)
        return None

    def post_hook(mod, args, kwargs, output):
        if not state.calls:  # an earlier pre-hook raised before ours ran
            return None
        if not state.calls.pop() or output is None or not any(t.weight != 0 for t in state.terms):
            return None  # a nested call (RLG's reference branch), a failed forward, or all weights 0: untouched
        return _replace_first(output, _guide_call(state, args, kwargs, _first_tensor(output)))

    state.post_hook = post_hook
    return pre_hook, post_hook


def _guide_call(state: _NRGState, args, kwargs, out: torch.Tensor) -> torch.Tensor:
    """The denoiser's output with g subtracted from every row (both CFG halves)."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if x is None or t is None:
        raise RuntimeError("NRG: the denoiser was called without hidden_states / timestep")
    prompts = state.prompts
    if prompts is None:
        raise ValueError("NRG needs the prompt text for its rewards: call pipe(prompt=...) (not prompt_embeds=...) "
                         "while NRG is on")
    pipe = state.pipe()
    b, n = len(prompts), out.shape[0]
    scale = float(getattr(pipe, "_guidance_scale", 1.0) or 1.0) if pipe is not None else 1.0
    if n == 2 * b and scale > 1:  # SD3's batched CFG: [uncond; cond] rows of the same latents
        v = out[:b].float() + scale * (out[b:].float() - out[:b].float())
        x_rows, repeat = x[b:], 2
    elif n == b:
        v, x_rows, repeat = out.float(), x, 1
    else:
        raise RuntimeError(f"NRG: the denoiser got {n} rows for {b} images; enable_nrg supports pipe(...) calls of "
                           "StableDiffusion3Pipeline (batched CFG)")
    tt = torch.as_tensor(t).detach().float().reshape(-1)
    t_key = float(tt.max())
    cached = state.cache
    if cached is not None and cached[0] == t_key and cached[1].shape == x_rows.shape and torch.equal(cached[1], x_rows):
        g = cached[2]
    else:
        sigma = (tt[-b:] if tt.numel() >= b else tt[:1]).to(x.device) / state.num_train_timesteps
        g = guidance(x_rows, v, sigma, state.terms, state.decode, prompts)
        state.cache = (t_key, x_rows, g)
    g = torch.cat([g] * repeat) if repeat > 1 else g
    return (out.float() - g).to(out.dtype)


def enable_nrg(pipe, rewards: RewardsLike, decode: Optional[Callable] = None,
               reward_options: Optional[Mapping[str, Mapping]] = None):
    """Make ``pipe(...)`` sample with Flow-NRG: ``v <- v - sum_j w_j grad_{x_t} R_j(decode(x_t - t v))``.

    Args:
        pipe: a StableDiffusion3Pipeline (other families: :func:`guided` on their flowalign adapter).
        rewards: ``{"clip_score": 2.0, "aesthetic": 1.0}`` (names of ``flowalign.rewards``) or a list of
            ``(Reward or name, weight)``; weight 0 switches an objective off, all 0 = no guidance (bit-exact).
            Only differentiable rewards (``flowalign.rewards.differentiable_rewards()``).
        decode: latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], differentiable (default: the flowalign
            adapter's ``decode``, i.e. the pipeline's VAE).
        reward_options: per-name build options, e.g. ``{"clip_score": {"model": "tiny"}}`` (the shipped tiny CLIP).
    Calling it again replaces the settings. Composes with ``enable_rlg`` in either order (module docstring).
    Returns ``pipe``.
    """
    family = _family(pipe)
    if family not in PIPELINE_FAMILIES:
        raise ValueError(f"enable_nrg supports pipe(...) of StableDiffusion3Pipeline, not {type(pipe).__name__} "
                         "(packed or otherwise laid-out latents): use flowalign.nrg.guided(adapter, rewards) with "
                         "flowalign.rollout for the other flow families")
    terms = resolve_rewards(rewards, reward_options)
    if decode is None:
        from .models import adapter_for

        decode = adapter_for(pipe).decode
    denoiser = getattr(pipe, "transformer", None)
    if not isinstance(denoiser, torch.nn.Module):
        raise ValueError(f"{type(pipe).__name__} has no transformer to guide")
    disable_nrg(pipe)
    state = _NRGState(terms=terms, decode=decode, pipe=weakref.ref(pipe),
                      num_train_timesteps=float(pipe.scheduler.config.get("num_train_timesteps", 1000)))
    pre, post = _make_hooks(state)
    state.handles.append(denoiser.register_forward_pre_hook(pre, with_kwargs=True))
    # always_call: the per-call bookkeeping is popped even when forward raises
    state.post_handle = denoiser.register_forward_hook(post, with_kwargs=True, always_call=True)
    pipe.encode_prompt = _record_prompts(state, pipe.encode_prompt)
    setattr(pipe, _ATTR, state)
    return pipe


def disable_nrg(pipe):
    """Remove Flow-NRG: hooks off, ``pipe.encode_prompt`` restored. Returns ``pipe``."""
    state: Optional[_NRGState] = getattr(pipe, _ATTR, None)
    if state is None:
        return pipe
    for handle in [*state.handles, state.post_handle]:
        if handle is not None:
            handle.remove()
    wrapper = pipe.__dict__.get("encode_prompt")
    original = getattr(wrapper, "_flowalign_nrg_original", None)
    if original is not None:
        if getattr(original, "__self__", None) is pipe and getattr(original, "__func__", None) is getattr(
                type(pipe), "encode_prompt", None):
            del pipe.__dict__["encode_prompt"]  # the class's own method again
        else:
            pipe.encode_prompt = original  # a wrapper someone installed before ours
    state.cache = None
    delattr(pipe, _ATTR)
    return pipe


def nrg_weights(pipe) -> Optional[dict]:
    """``{reward name: weight}`` of the active Flow-NRG on ``pipe`` (None when off)."""
    state = getattr(pipe, _ATTR, None)
    return None if state is None else state.weights


# ---- the adapter path (flowalign's own sampler) ------------------------------------------------------------------
class NRGAdapter:
    """A flowalign flow adapter whose ``predict`` returns the Flow-NRG velocity; everything else is the adapter's.

    ``predict(x, timestep, cond, g)`` = ``v - guidance(x, v, timestep / num_train_timesteps, ...)`` with v the
    adapter's CFG-combined prediction [B, ...] (unpacked latents in every family), the prompts and per-row
    metadata of ``cond``, and the adapter's ``decode``. Use it wherever an adapter goes, e.g.
    ``rollout(guided(adapter, {"clip_score": 2.0}, reward_options=...), prompts, sampler="flow_ode")``.
    Weight 0 everywhere returns the adapter's prediction unchanged (bit-exact)."""

    def __init__(self, adapter, rewards: RewardsLike, reward_options: Optional[Mapping[str, Mapping]] = None,
                 decode: Optional[Callable] = None):
        if not getattr(adapter, "is_flow", False):
            raise ValueError(f"NRG guides flow families; the {getattr(adapter, 'family', '?')} adapter predicts "
                             "DDIM epsilon / v")
        self.adapter = adapter
        self.terms = resolve_rewards(rewards, reward_options)
        self.decode = decode or adapter.decode
        self.num_train_timesteps = float(adapter.pipe.scheduler.config.get("num_train_timesteps", 1000))

    def __getattr__(self, name):
        return getattr(self.__dict__["adapter"], name)

    @property
    def weights(self) -> dict:
        return {t.name: t.weight for t in self.terms}

    def predict(self, x: torch.Tensor, timestep, cond, guidance_scale: float = 1.0) -> torch.Tensor:
        v = self.adapter.predict(x, timestep, cond, guidance_scale)
        if not any(t.weight != 0 for t in self.terms):
            return v
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device)
        return guided_velocity(x, v, t / self.num_train_timesteps, self.terms, self.decode, cond.prompts,
                               cond.metadata())


def guided(adapter, rewards: RewardsLike, reward_options: Optional[Mapping[str, Mapping]] = None,
           decode: Optional[Callable] = None) -> NRGAdapter:
    """``NRGAdapter(adapter, rewards, reward_options, decode)``: the adapter with Flow-NRG in its ``predict``."""
    return NRGAdapter(adapter, rewards, reward_options, decode)


__all__ = ["NRGAdapter", "NRGTerm", "disable_nrg", "enable_nrg", "guidance", "guided", "guided_velocity", "nrg_weights",
           "resolve_rewards"]
