"""flowalign: align diffusion and flow-matching generators to rewards with LoRA adapters.

Subpackages: ``flowalign.samplers`` (per-step Gaussian transitions, torch only),
``flowalign.rewards`` (reward models), ``flowalign.models`` (pipeline adapters),
``flowalign.algorithms`` (losses), ``flowalign.toy`` (the offline scene world).
"""

__version__ = "0.1.0"
