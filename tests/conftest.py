"""Shared pytest configuration: slow / gpu markers skip visibly, every test runs offline on CPU threads we control."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Corpora, tokenizers and packed datasets are cached on disk; tests share one fresh cache per session (subprocesses
# inherit it) so that they neither read a stale user cache nor fill ~/.cache. Set HF_EFFITRAIN_CACHE to reuse one.
os.environ.setdefault("HF_EFFITRAIN_CACHE", tempfile.mkdtemp(prefix="hf_effitrain_test_cache_"))


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
