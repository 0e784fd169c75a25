"""Test setup: the repository root on sys.path; one torch thread (tiny models run faster without OpenMP spinning)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(1)
