import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (on 2 shared cores OpenMP spins badly), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
