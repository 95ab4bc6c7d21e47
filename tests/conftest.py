"""Shared fixtures: tiny random-initialised models of each architecture family."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from tests import tiny  # noqa: E402


@pytest.fixture(params=tiny.ARCHS)
def arch(request) -> str:
    return request.param
