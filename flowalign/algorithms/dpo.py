"""Flow-DPO: Diffusion-DPO on the rectified-flow forward process (VideoAlign, "Improving Video Generation with Human
Feedback", arXiv 2501.13918; docs/algorithms/dpo.md). No I/O (the preference file is read by flowalign.preferences).

A pair (x0_w, x0_l) of one prompt c, x0_w preferred. Both members are noised with the SAME t and the SAME eps:

    x_t^k = (1 - t) x0_k + t eps,        u_k = eps - x0_k                         (k in {w, l})
    e_theta(k) = mean_d |v_theta(x_t^k, t, c) - u_k|^2,   e_ref(k) likewise with the LoRA adapter disabled
    z = -(beta_t / 2) [ (e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l)) ]
    L = -log sigmoid(z)                                                            (mean over pairs)

At theta = ref, z = 0 and L = log 2. dL/de_theta(w) = (beta_t / 2) sigmoid(-z) > 0 and dL/de_theta(l) < 0: the loss
pushes the preferred sample's flow-matching error down and the rejected one's up, relative to the reference.

``weighting="constant"`` (default): beta_t = beta, the form the paper reports working best (a constant beta, not
scaled by t) [ref: the paper, via third-party summaries; the exact value of beta is [assumed]].
``weighting="eps"`` [derived]: beta_t = beta (1 - t)^2, which is Diffusion-DPO's loss (constant weight) on the
epsilon predictions eps_hat = x_t + (1 - t) v, since eps_hat - eps = (1 - t)(v - u): the timestep-dependent form
a direct transfer of Diffusion-DPO gives (the paper's own beta_t may differ [uncertain]).

Velocities are the conditional ones (guidance 1, no CFG), as Diffusion-DPO trains the conditional model.
Pairs: ``FlowDPOUpdate`` takes them ONLINE (each prompt group's best and worst rollout sample by reward; a group
whose best-worst gap is <= ``dpo.min_reward_gap`` gives none) or OFFLINE (a preference file, images encoded with
the pipeline's VAE by ``encode_images``). Timesteps: ``dpo.timesteps_per_pair`` draws per pair, each uniform over
the pipeline scheduler's ``dpo.timestep_grid``-step grid (its shift included) [assumed: the paper's t distribution
is not known here].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import lora
from ..models.base import Conditioning
from ..rollout import Trajectory
from ..runtime.distributed import Part
from ..samplers._checks import randn_like
from ..samplers.flow import ForwardSample, forward_process
from .advantages import group_ids_from_prompts
from .base import UpdateRule, require_flow

WEIGHTINGS = ("constant", "eps")
PAIR_SOURCES = ("online", "offline")
REDUCTIONS = ("mean", "sum")
# families whose decode is ``vae.decode(z / scaling_factor + shift_factor)``: encode_images inverts exactly that
ENCODABLE_FAMILIES = ("sd3", "flux", "zimage")


# ---- the loss ---------------------------------------------------------------------------------------


def flow_matching_error(v: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``e = mean_d (v - u)^2`` (``reduction="sum"``: sum_d) -> [B], in the wider of the dtypes, at least float32.

    v: a velocity [B, ...] (with or without grad); target: u = eps - x0 [B, ...] (detached here)."""
    if v.shape != target.shape:
        raise ValueError(f"v {tuple(v.shape)} and target {tuple(target.shape)} must share one shape [B, ...]")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dtype = torch.promote_types(torch.promote_types(v.dtype, target.dtype), torch.float32)
    sq = ((v.to(dtype) - target.to(dtype).detach()) ** 2).reshape(v.shape[0], -1)
    return sq.mean(1) if reduction == "mean" else sq.sum(1)


def dpo_beta(beta: float, t: Optional[torch.Tensor] = None, weighting: str = "constant") -> torch.Tensor:
    """beta_t: ``beta`` ("constant") or ``beta (1 - t)^2`` ("eps", t [P] required) -> a scalar tensor or [P]."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if weighting == "constant":
        return torch.tensor(float(beta))
    if t is None:
        raise ValueError("weighting='eps' needs the pairs' t [P]")
    return beta * (1 - t.float()) ** 2


@dataclass
class DPOLoss:
    """loss: scalar (mean over pairs) to minimise; logit: z [P] (detached; > 0 where the policy already prefers w
    more than the reference does); e_w, e_l, ref_w, ref_l: [P] flow-matching errors (detached)."""

    loss: torch.Tensor
    logit: torch.Tensor
    e_w: torch.Tensor
    e_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor


def dpo_loss_from_errors(e_w: torch.Tensor, e_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                         beta_t) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = -(beta_t / 2) [(e_w - ref_w) - (e_l - ref_l)]`` and ``L = mean_P -log sigmoid(z)`` -> (L, z [P]).

    e_w, e_l: the policy's errors [P] (with grad); ref_w, ref_l: the reference's [P] (detached here); beta_t: a
    number or [P]."""
    if not (e_w.shape == e_l.shape == ref_w.shape == ref_l.shape) or e_w.dim() != 1:
        raise ValueError(f"e_w {tuple(e_w.shape)}, e_l {tuple(e_l.shape)}, ref_w {tuple(ref_w.shape)} and ref_l "
                         f"{tuple(ref_l.shape)} must all be [P]")
    beta_t = torch.as_tensor(beta_t, dtype=e_w.dtype, device=e_w.device)
    z = -(beta_t / 2) * ((e_w - ref_w.detach()) - (e_l - ref_l.detach()))
    return -F.logsigmoid(z).mean(), z


def flow_dpo_loss(v_w: torch.Tensor, v_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                  point_w: ForwardSample, point_l: ForwardSample, beta: float, weighting: str = "constant",
                  reduction: str = "mean") -> DPOLoss:
    """The Flow-DPO loss of P pairs at one forward-process draw (module docstring).

    Args:
        v_w, v_l: the policy's velocities at x_t^w, x_t^l [P, ...] (with grad), guidance 1.
        ref_w, ref_l: the reference's (adapter disabled) at the same points [P, ...] (no grad).
        point_w, point_l: the pairs' forward-process points (``pair_forward``): the same t [P] and eps on both sides.
        beta: the DPO strength (> 0); weighting: "constant" (beta_t = beta) or "eps" (beta (1 - t)^2).
        reduction: "mean" (default) or "sum" of the squared errors over elements.
    """
    if not torch.equal(point_w.t, point_l.t):
        raise ValueError("both members of a pair must be noised at the same t (build the points with pair_forward)")
    beta_t = dpo_beta(beta, point_w.t, weighting)
    e_w, e_l = flow_matching_error(v_w, point_w.target, reduction), flow_matching_error(v_l, point_l.target, reduction)
    r_w = flow_matching_error(ref_w.detach(), point_w.target, reduction)
    r_l = flow_matching_error(ref_l.detach(), point_l.target, reduction)
    loss, z = dpo_loss_from_errors(e_w, e_l, r_w, r_l, beta_t.to(e_w.device))
    return DPOLoss(loss=loss, logit=z.detach(), e_w=e_w.detach(), e_l=e_l.detach(), ref_w=r_w, ref_l=r_l)


def pair_forward(x0_w: torch.Tensor, x0_l: torch.Tensor, t, noise: torch.Tensor) -> tuple[ForwardSample, ForwardSample]:
    """The two forward-process points of P pairs with ONE t [P] (or a float) and ONE eps [P, ...] for both sides:
    ``x_t^k = (1 - t) x0_k + t eps``, ``u_k = eps - x0_k``."""
    if x0_w.shape != x0_l.shape:
        raise ValueError(f"x0_w {tuple(x0_w.shape)} and x0_l {tuple(x0_l.shape)} must share one shape [P, ...]")
    return forward_process(x0_w, t, noise=noise), forward_process(x0_l, t, noise=noise)


# ---- pairs ------------------------------------------------------------------------------------------


def select_pairs(rewards: torch.Tensor, group_ids: torch.Tensor, valid: Optional[torch.Tensor] = None,
                 min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Online pairs: per prompt group (in order of first appearance), the valid row with the highest reward (w) and
    the one with the lowest (l; the first such row on ties). A group with fewer than two valid rows, or whose
    best-worst gap is <= ``min_gap`` (ties, zero spread), gives no pair.

    rewards [B], group_ids [B] long, valid [B] bool -> (w rows [P] long, l rows [P] long, groups skipped)."""
    rewards = rewards.detach().double().cpu()
    group_ids = group_ids.cpu()
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    ok = torch.isfinite(rewards) if valid is None else valid.cpu().bool() & torch.isfinite(rewards)
    w_rows, l_rows, skipped = [], [], 0
    _, first = np.unique(group_ids.numpy(), return_index=True)
    for g in group_ids[np.sort(first)]:
        members = torch.nonzero((group_ids == g) & ok).flatten()
        if members.numel() < 2:
            skipped += 1
            continue
        r = rewards[members]
        best, worst = int(torch.argmax(r)), int(torch.argmin(r))
        if not float(r[best] - r[worst]) > min_gap:
            skipped += 1
            continue
        w_rows.append(int(members[best]))
        l_rows.append(int(members[worst]))
    return torch.tensor(w_rows, dtype=torch.long), torch.tensor(l_rows, dtype=torch.long), skipped


def check_encodable(adapter) -> None:
    """Raise one line unless ``encode_images`` knows the adapter's latent convention (``ENCODABLE_FAMILIES``)."""
    family = getattr(adapter, "family", "?")
    if family not in ENCODABLE_FAMILIES:
        raise ValueError(f"offline Flow-DPO encodes preference images for the {', '.join(ENCODABLE_FAMILIES)} "
                         f"families (shift/scale VAE latents), not {family}: use dpo.pairs=online")


def vae_downscale(adapter) -> int:
    """Pixels per latent cell of the pipeline's VAE: ``2 ** (len(block_out_channels) - 1)``."""
    return 2 ** (len(adapter.pipe.vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_images(adapter, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> float32 latents [B, C, H/f, W/f] in the adapter's latent convention, the
    inverse of its ``decode``: ``z = (mode(vae.encode(2 x - 1)) - shift_factor) * scaling_factor`` (the posterior's
    mode; decode is ``vae.decode(z / scaling_factor + shift_factor)``). Families: ``ENCODABLE_FAMILIES``."""
    check_encodable(adapter)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    vae = adapter.pipe.vae
    cfg = vae.config
    x = (2 * images.float().clamp(0, 1) - 1).to(adapter.device, vae.dtype)
    out = vae.encode(x, return_dict=False)[0]
    z = out.mode() if hasattr(out, "mode") else out
    shift = cfg.get("shift_factor", None) or 0.0
    return ((z.float() - shift) * cfg.scaling_factor).float()


# ---- update rule ------------------------------------------------------------------------------------


class FlowDPOUpdate(UpdateRule):
    """Flow-DPO (module docstring) on a trainer state.

    Online (``dpo.pairs: online``): the live policy rolls out (the sampling section); ``select_pairs`` takes each
    prompt group's best and worst sample by reward (a group of ties gives none, counted in ``skipped_groups``).
    Offline (``dpo.pairs: offline``): ``dpo.pairs_per_iter`` pairs a iteration from ``dpo.preference_file`` (each
    pair once per pass, in a shuffled order), its images resized to the rollout's size and encoded with the
    pipeline's VAE (``encode_images``, once per image); the rollout still runs and is scored, for the reward metrics
    only. Per inner epoch the pairs are shuffled and split into minibatches of ``train.minibatch // 2`` pairs; for
    each, ``dpo.timesteps_per_pair`` draws of (t, eps) shared by both members, the policy's and the reference's
    (adapter disabled) velocities at guidance 1 on the 2P noised latents, ``flow_dpo_loss``; gradients accumulate
    over the draws, one optimizer step per minibatch.
    Metrics: loss, accuracy (share of pairs with z > 0), logit (mean z), e_w / e_l (policy errors), ref_w / ref_l,
    pairs, skipped_groups (online), reward_gap (online: mean best - worst reward), grad_norm, optimizer_steps,
    update_samples (2 x pairs).
    Distributed: online pairs lie inside one process's shard (groups are never split), so a pair's rows are always
    held together; offline pairs are computed by every process at weight 1 / world_size (not split).
    """

    name = "dpo"
    title = "Flow-DPO"

    def __init__(self, cfg, adapter, params, optimizer, generator):
        super().__init__(cfg, adapter, params, optimizer, generator)
        require_flow(adapter, "dpo")
        c = cfg.dpo
        self.offline = c.pairs == "offline"
        self.uses_rewards = not self.offline  # offline pairs do not need the rollout's rewards
        self.pairs: list = []
        self.order = torch.zeros(0, dtype=torch.long)  # offline: this pass's shuffled pair order
        self.cursor = 0
        self._latents: dict = {}  # (image path, latent size) -> latent [C, h, w]
        self._grids: dict = {}  # latent shape -> (timesteps [N], sigmas [N])
        if self.offline:
            from ..preferences import read_preference_file

            check_encodable(adapter)
            self.pairs = read_preference_file(c.preference_file)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.order = torch.as_tensor(state["order"], dtype=torch.long).clone()
        self.cursor = int(state["cursor"])

    # ---- timesteps ---------------------------------------------------------------------------------
    def _grid(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(x0.shape[1:])
        if key not in self._grids:
            grid = self.adapter.sampling_grid(self.cfg.dpo.timestep_grid, x0[:1])
            n = grid.timesteps.shape[0]
            self._grids[key] = (grid.timesteps.float(), grid.sigmas[:n].float())
        return self._grids[key]

    # ---- offline pairs -----------------------------------------------------------------------------
    def _next_pairs(self, n: int) -> list:
        """The next n offline pairs: a fresh shuffled order of the whole file whenever the last one is used up."""
        out = []
        while len(out) < n:
            if self.cursor >= self.order.numel():
                self.order = torch.randperm(len(self.pairs), generator=self.generator)
                self.cursor = 0
            take = min(n - len(out), self.order.numel() - self.cursor)
            out += [self.pairs[int(i)] for i in self.order[self.cursor:self.cursor + take]]
            self.cursor += take
        return out

    def _pair_latents(self, pairs: Sequence, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [P, *shape] of the pairs' chosen and rejected images (resized to the rollout's pixel size)."""
        from ..preferences import load_pair_image

        f = vae_downscale(self.adapter)
        size = (shape[-2] * f, shape[-1] * f)
        out = {}
        for key in ("chosen", "rejected"):
            rows = []
            for p in pairs:
                cache = (getattr(p, key), size)
                if cache not in self._latents:
                    z = encode_images(self.adapter, load_pair_image(p, key, size)[None])[0]
                    if tuple(z.shape) != tuple(shape):
                        raise ValueError(f"{p.where}: the {key} image encodes to latents {tuple(z.shape)}, the "
                                         f"rollout's are {tuple(shape)}")
                    self._latents[cache] = z
                rows.append(self._latents[cache])
            out[key] = torch.stack(rows)
        return out["chosen"], out["rejected"]

    # ---- one minibatch of pairs --------------------------------------------------------------------
    def _pair_step(self, x0_w, x0_l, cond: Optional[Conditioning], part: Part, noise_source, stats: dict) -> None:
        """Backward of the minibatch's DPO loss (x0_w, x0_l [b, ...], cond: 2b rows, w then l) over the draws."""
        c = self.cfg.dpo
        timesteps, sigmas = self._grid(x0_w)
        b = x0_w.shape[0]
        for _ in range(c.timesteps_per_pair):
            pos = torch.randint(timesteps.shape[0], (part.total,), generator=self.generator)
            pos = pos if part.pos is None else pos[part.pos.cpu()]
            pos = pos.to(timesteps.device)
            ts, t = timesteps[pos], sigmas[pos]
            noise = randn_like(x0_w, noise_source)
            if b == 0:  # distributed: this process holds none of the minibatch's pairs
                continue
            point_w, point_l = pair_forward(x0_w, x0_l, t.to(x0_w.device), noise)
            x = torch.cat([point_w.x_t, point_l.x_t])
            ts2 = torch.cat([ts, ts]).to(x.device)
            with torch.no_grad(), lora.adapter_disabled(self.adapter):
                ref = self.adapter.predict(x, ts2, cond, 1.0)
            v = self.adapter.predict(x, ts2, cond, 1.0)
            out = flow_dpo_loss(v[:b], v[b:], ref[:b], ref[b:], point_w, point_l, beta=c.beta,
                                weighting=c.weighting, reduction=c.reduction)
            (out.loss * part.share / c.timesteps_per_pair).backward()
            if part.placeholder:
                continue
            stats["loss"].append(out.loss.item())
            for k in ("logit", "e_w", "e_l", "ref_w", "ref_l"):
                stats[k].append(getattr(out, k).mean().item())
            stats["accuracy"].append((out.logit > 0).float().mean().item())

    def update(self, traj: Trajectory, adv: torch.Tensor, valid: torch.Tensor, rewards=None, tasks=None) -> dict:
        c, t = self.cfg.dpo, self.cfg.train
        per_mb = max(1, t.minibatch // 2)
        extra: dict = {}
        if self.offline:
            pairs = self._next_pairs(c.pairs_per_iter)
            n_pairs = len(pairs)
        else:
            gids = group_ids_from_prompts(self.dist.gather_objects(traj.group_keys))
            values = rewards if rewards is not None else adv
            w_rows, l_rows, skipped = select_pairs(values, gids, valid)
            n_pairs = int(w_rows.numel())
            extra["skipped_groups"] = skipped
            if n_pairs:
                r = values.detach().double().cpu()
                extra["reward_gap"] = float((r[w_rows] - r[l_rows]).mean())
            w_rows, l_rows = w_rows.to(valid.device), l_rows.to(valid.device)
        if n_pairs == 0:
            return {"update_samples": 0, "pairs": 0, **extra}
        stats = {k: [] for k in ("loss", "logit", "e_w", "e_l", "ref_w", "ref_l", "accuracy")}
        grad_norm = 0.0
        for _ in range(c.inner_epochs):
            perm = torch.randperm(n_pairs, generator=self.generator)
            for mb in perm.split(per_mb):
                self.optimizer.zero_grad(set_to_none=True)
                if self.offline:
                    chosen = [pairs[int(i)] for i in mb]
                    x0_w, x0_l = self._pair_latents(chosen, tuple(traj.final.shape[1:]))
                    prompts = [p.prompt for p in chosen]
                    cond = self.adapter.encode_prompts(prompts + prompts, 1.0)
                    idx = torch.arange(len(chosen))
                    part = Part(idx, idx, None, len(chosen), 1.0 / self.dist.world_size)
                    self._pair_step(x0_w, x0_l, cond, part, self.generator, stats)
                else:
                    mb = mb.to(w_rows.device)
                    part = self.dist.part(w_rows[mb], traj.batch_size)  # the pairs this process holds
                    part_l = self.dist.part(l_rows[mb], traj.batch_size)
                    if part.pos is not None and not torch.equal(part.pos, part_l.pos):
                        raise RuntimeError("a DPO pair's rows are held by two processes (a prompt group was split)")
                    x0_w, x0_l = traj.final[part.local], traj.final[part_l.local]
                    cond = traj.cond.select(torch.cat([part.local, part_l.local])) if part.size else None
                    # a process holding none of the pairs still draws their noise (the generator stays in step)
                    self._pair_step(x0_w, x0_l, cond, part, self.dist.noise(self.generator, part), stats)
                grad_norm = self.optimizer_step()
        out = {"update_samples": 2 * n_pairs, "pairs": n_pairs, "grad_norm": grad_norm,
               "optimizer_steps": self.optimizer_steps, **extra}
        if stats["loss"]:
            out.update({k: float(np.mean(v)) for k, v in stats.items()})
        return out
