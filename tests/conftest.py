"""Test-suite settings: one torch thread (the tests' tensors are small; on a busy
2-core machine more threads only thrash)."""

import torch

torch.set_num_threads(1)
