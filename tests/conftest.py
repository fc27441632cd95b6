"""Fixtures every test file uses."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Token caches and the built-in corpus go to the test's own directory, never ~/.cache."""
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # Tests use tiny models: their matmuls gain nothing from threads, and on a busy machine
    # waiting for the other thread costs a lot.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
