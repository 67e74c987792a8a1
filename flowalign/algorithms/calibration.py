"""InfAlign-CTRL ("InfAlign: Inference-aware language model alignment", Balashankar et al., arXiv 2412.19792):
calibrate the reward to the base model's own distribution per prompt, then RL on a transform of it.

Calibration: for a sample x of prompt c with reward R(x, c) and M base samples x'_1..x'_M ~ pi_ref(c),

    C(x, c) = (1/M) sum_m 1[ R(x'_m, c) <= R(x, c) ]          in {0, 1/M, ..., 1}

the empirical CDF of the base's rewards at the sample's reward (ties count as "<=", so a sample equal to
every base sample gets C = 1). C is invariant to any increasing map of R, so rewards of different prompts
(and scales) become comparable.

Transform (chosen for the inference procedure the aligned model will be used with):

    identity : C                                   (calibrated standard win rate)
    log      : log( (M C + 1/2) / (M + 1) )          [flowalign's smoothing: avoids log 0 at C = 0]
    exp      : exp( t C )                            (best-of-N sampling)
    neg_exp  : -exp( -t C )                          (best-of-N jailbreaking / worst-of-N)

``t`` is a temperature of the exponential transforms; flowalign's default 4.0 is [assumed] (not confirmed from
the paper's text). Evaluation: ``best_of_n_win_rate`` (per prompt best of N aligned vs best of N base).
Pure functions, no I/O.
"""

from __future__ import annotations

import math

import torch

TRANSFORMS = ("identity", "log", "exp", "neg_exp")
DEFAULT_T = 4.0  # [assumed] temperature of exp / neg_exp


def calibrate(scores: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The empirical calibrated reward ``C_b = (1/M) sum_m 1[base_{b,m} <= scores_b]``.

    Args:
        scores: [B] raw rewards of the samples (NaN allowed: gives NaN).
        base: [B, M] raw rewards of M base samples of each row's prompt (NaN base scores are left out of that
            row's count and of its M; a row without one finite base score gives NaN).
    Returns: [B] float32 in [0, 1].
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    base = torch.as_tensor(base, dtype=torch.float64)
    if base.dim() != 2 or base.shape[0] != scores.shape[0]:
        raise ValueError(f"calibrate: base must be [B, M] with B = {scores.shape[0]}, got {list(base.shape)}")
    finite = torch.isfinite(base)
    m = finite.sum(dim=1)
    below = ((base <= scores[:, None]) & finite).sum(dim=1).double()
    c = below / m.clamp(min=1)
    c[~torch.isfinite(scores) | (m == 0)] = float("nan")
    return c.float()


def transform(c: torch.Tensor, kind: str, t: float = DEFAULT_T, m: int | torch.Tensor | None = None
              ) -> torch.Tensor:
    """Transformed calibrated reward Phi(C) [B] of ``c`` [B] (NaN stays NaN).

    kind: identity -> C; log -> log((M C + 1/2) / (M + 1)) (M = ``m``, the base samples per prompt; required,
    flowalign's smoothing); exp -> exp(t C) (best-of-N sampling); neg_exp -> -exp(-t C) (best-of-N
    jailbreaking). Every transform is increasing in C.
    """
    c = torch.as_tensor(c, dtype=torch.float32)
    if kind == "identity":
        return c.clone()
    if kind == "log":
        if m is None:
            raise ValueError("transform(kind='log') needs m, the number of base samples per prompt")
        m = torch.as_tensor(m, dtype=torch.float32)
        return torch.log((m * c + 0.5) / (m + 1))
    if kind == "exp":
        return torch.exp(float(t) * c)
    if kind == "neg_exp":
        return -torch.exp(-float(t) * c)
    raise ValueError(f"calibration transform {kind!r} is not valid; choose one of {', '.join(TRANSFORMS)}")


def best_of_n_win_rate(aligned: torch.Tensor, base: torch.Tensor) -> tuple[float, float]:
    """Best-of-N win rate of the aligned model against the base, with its standard error.

    Per prompt p: ``w_p = 1[max_n aligned_{p,n} > max_n base_{p,n}] + 1/2 1[equal]``; returns
    ``(mean_p w_p, std_p(w_p) / sqrt(P))`` (population std over the P prompts; the SE is 0 for P = 1).
    NaN scores are left out of each max; a prompt without a finite score on either side is left out.

    Args:
        aligned: [P, N] rewards of N aligned samples per prompt; base: [P, N'] rewards of the base's.
    """
    a = torch.as_tensor(aligned, dtype=torch.float64)
    b = torch.as_tensor(base, dtype=torch.float64)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"best_of_n_win_rate: aligned and base must be [P, N] with one P, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    best_a = torch.where(torch.isnan(a), neg, a).max(dim=1).values
    best_b = torch.where(torch.isnan(b), neg, b).max(dim=1).values
    keep = torch.isfinite(a).any(dim=1) & torch.isfinite(b).any(dim=1)
    if not bool(keep.any()):
        return float("nan"), float("nan")
    best_a, best_b = best_a[keep], best_b[keep]
    w = (best_a > best_b).double() + 0.5 * (best_a == best_b).double()
    p = w.numel()
    rate = float(w.mean())
    se = float(w.std(unbiased=False)) / math.sqrt(p) if p > 1 else 0.0
    return rate, se
