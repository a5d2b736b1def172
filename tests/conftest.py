"""Shared fixtures. The exact reference the curvature tests compare against lives in
``tests/_reference.py`` (a plain module: ``from _reference import ...``)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (on 2 shared cores OpenMP spins badly), restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mixed_modes():
    """``mixed_modes(model, *eval_names)``: put ``model`` in train mode except the named
    submodules (eval mode) and return a function asserting that every submodule still has
    exactly that ``training`` flag."""

    def make(model, *eval_names):
        model.train()
        for name in eval_names:
            model.get_submodule(name).eval()
        expected = {name: m.training for name, m in model.named_modules()}
        assert not all(expected.values()) and any(expected.values())

        def check():
            got = {name: m.training for name, m in model.named_modules()}
            assert got == expected, {k: v for k, v in got.items() if v != expected[k]}
        return check

    return make
