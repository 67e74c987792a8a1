"""``safe_scores``: score a batch so that one bad sample cannot poison it.

Score the batch; if the reward raises, score the samples one by one. A sample whose score is NaN/inf or
whose scoring raised is marked invalid and its score set to 0; the trainer drops invalid samples from
the advantages. One ``RuntimeWarning`` names the reward and the count. If EVERY sample raises, the
reward itself is broken: the batch's error is re-raised. A ``RewardUnavailable`` (a reward server that is down,
or answers replies that break its protocol) is re-raised at once: asking again per sample would only repeat the
wait B times.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch

from .base import RewardUnavailable


def _item(images, i: int):
    return images[i:i + 1] if isinstance(images, torch.Tensor) else [images[i]]


def safe_scores(reward, images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (scores [B] float32 with invalid set to 0, valid [B] bool, n_bad)."""
    prompts = list(prompts)
    b = len(prompts)
    name = getattr(reward, "name", type(reward).__name__)
    first_error = None
    try:
        scores = torch.as_tensor(reward(images, prompts, metadata), dtype=torch.float32).detach().cpu().reshape(b)
    except RewardUnavailable:
        raise
    except Exception as batch_error:
        vals, raised = [], 0
        for i in range(b):
            try:
                meta = None if metadata is None else [metadata[i]]
                vals.append(float(reward(_item(images, i), [prompts[i]], meta).reshape(-1)[0]))
            except Exception as e:
                first_error, raised = first_error or e, raised + 1
                vals.append(float("nan"))
        if raised == b:  # every sample failed: the reward, not an image, is broken
            raise batch_error
        scores = torch.tensor(vals, dtype=torch.float32)
    valid = torch.isfinite(scores)
    n_bad = int((~valid).sum())
    if n_bad:
        why = f"; first error: {first_error!r}" if first_error is not None else ""
        warnings.warn(f"reward {name}: {n_bad}/{b} samples invalid (NaN/inf or raised), scored 0 and marked "
                      f"invalid{why}", RuntimeWarning, stacklevel=2)
    return torch.where(valid, scores, torch.zeros_like(scores)), valid, n_bad
