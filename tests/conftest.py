"""Test-suite settings: one torch thread, here and in the processes the tests start (the tests'
tensors are small; the suite runs a worker per core, and more threads per worker only thrash)."""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
