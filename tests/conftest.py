import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import the shared model zoo in models.py


@pytest.fixture(scope="module")
def one_thread():
    """Small models: torch's intra-op threads only add synchronisation on this shared 2-core
    machine (measured 3-6x slower with 2 threads). Modules opt in with `usefixtures`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
