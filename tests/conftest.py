import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))  # benchmarks.algorithm1: the paper's Algorithm 1, the reference tests compare with


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
