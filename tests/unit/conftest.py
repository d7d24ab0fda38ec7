"""Unit tests run tiny models on a shared machine: one intra-op thread avoids oversubscription."""

import torch

torch.set_num_threads(1)
