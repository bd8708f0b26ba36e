"""Shared pytest setup: ``@pytest.mark.slow`` tests run only with ``--run-slow``; ``@pytest.mark.gpu`` tests
run only where CUDA is available."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow test: pass --run-slow to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    run_slow = config.getoption("--run-slow")
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
