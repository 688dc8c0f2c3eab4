"""Shared pytest configuration: slow / gpu markers skip visibly, every test runs offline on CPU threads we control."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("EFFI_RUN_SLOW") == "1"
    has_gpu = torch.cuda.is_available()
    skip_slow = pytest.mark.skip(reason="slow test: set EFFI_RUN_SLOW=1 to run it")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
