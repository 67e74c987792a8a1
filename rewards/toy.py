"""``toy_geneval``: the verifiable GenEval-style reward of the offline toy world (flowalign.toy).

score = fraction of the prompt's constraints met (object, count, colour, position, colour attribution),
or, with ``strict=True``, 1 iff all are met. ``no_extra=True`` adds the check "no more objects than asked"
(GenEval's checks ignore extras, which aligned models learn to draw); ``partial=True`` grades a failed count
or relation in [0, 1/2] by how near it came (flowalign.toy.geneval). Both are training-reward options.

The one reward that imports from the core package (at call time): the toy world's detector lives in
``flowalign.toy`` (DESIGN.md), which ships in the same distribution, so the import always resolves.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Images, Reward


class ToyGenEvalReward(Reward):
    name = "toy_geneval"

    def __init__(self, strict: bool = False, no_extra: bool = False, partial: bool = False):
        self.strict = strict
        self.no_extra = no_extra
        self.partial = partial

    # more objects than asked is the hedge; a check kind that passes less often is a trade
    diagnostic_directions = {"extra_objects": 1, "check/shape": -1, "check/colour+shape": -1, "check/count": -1,
                             "check/relation": -1}

    def diagnostics(self, images: Images, prompts: Sequence[str]) -> dict:
        """``extra_objects`` and ``check/<kind>`` per image (flowalign.toy.diagnostics)."""
        from flowalign.toy import diagnostics

        try:
            return diagnostics(images, list(prompts))
        except ValueError:  # prompts outside the toy world: score() says so
            return {}

    def score(self, images: Images, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None) -> torch.Tensor:
        from flowalign.toy import toy_geneval  # the toy world lives in the core package

        try:
            frac, strict, _ = toy_geneval(images, prompts, no_extra=self.no_extra, partial=self.partial)
        except ValueError as err:
            if "cannot parse prompt" not in str(err):
                raise
            # the prompt itself is not repeated: it may be a line of any file train.prompts pointed at
            raise ValueError("toy_geneval scores the toy world's prompts only (e.g. 'a red circle', 'two blue "
                             "squares'), and a prompt of this batch is not one: set train.prompts to toy or "
                             "toy:TASK, or use a reward that reads any prompt (e.g. clip_score)") from None
        return strict if self.strict else frac
