"""Suite-wide settings: one torch thread per test process.

`make test` runs pytest with two workers on a 2-core machine; two threads each would oversubscribe the cores
and make the tiny-model tests many times slower.
"""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)
