"""Test setup: kernels run through Triton's interpreter on machines without a GPU.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` kernel is defined, i.e. before
``rqvae_fast.kernels`` is imported, so it is set here, first.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rqvae_fast._triton_available import HAS_TRITON  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true",
                     help="deep hypothesis runs (same as RQVAE_HYPOTHESIS_PROFILE=slow)")


def pytest_configure(config):
    if config.getoption("--slow"):
        os.environ["RQVAE_HYPOTHESIS_PROFILE"] = "slow"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_thread():
    """Small models and tensors: one thread avoids OpenMP oversubscription on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def poison(monkeypatch):
    """Make ``torch.empty``/``empty_like`` return garbage (NaN / -7777) so unwritten outputs show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool and t.numel() > 0:
            t.fill_(-7777)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    yield


requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed on this platform")
