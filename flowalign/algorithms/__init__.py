"""flowalign.algorithms: one file per method (its losses and its update rule, no I/O) and ONE table.

``ALGORITHMS`` maps ``train.algorithm`` to the method's :class:`~flowalign.algorithms.base.UpdateRule`; the trainer,
the config's choices, the demo's report titles and the contract test (tests/algorithms/test_update_rule_contract.py)
all read it. Adding a method = its file, one line here, its config section, and its recipe (docs/extending.md).
Shared primitives live apart: ``advantages`` (group advantages), ``timesteps`` (forward-process draws),
``divergences`` (the f-divergence table); the forward process itself is ``flowalign.samplers.forward_process``.
"""

from __future__ import annotations

from .backprop import BackpropUpdate
from .base import UpdateRule
from .crd import CRDUpdate
from .dpo import FlowDPOUpdate
from .grpo import GRPOUpdate
from .nft import NFTUpdate
from .opd import OPDUpdate
from .rwr import FlowRWRUpdate

ALGORITHMS: dict[str, type[UpdateRule]] = {
    rule.name: rule for rule in (GRPOUpdate, NFTUpdate, CRDUpdate, OPDUpdate, BackpropUpdate, FlowDPOUpdate,
                                 FlowRWRUpdate)
}

__all__ = ["ALGORITHMS", "BackpropUpdate", "CRDUpdate", "FlowDPOUpdate", "FlowRWRUpdate", "GRPOUpdate", "NFTUpdate",
           "OPDUpdate", "UpdateRule"]
