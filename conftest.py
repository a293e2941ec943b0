"""pytest's setup for this folder. With `pytest -n N` (pytest-xdist), the N workers' torch threads add up to the
cores this machine gives the suite, as one process's threads do without it."""
import os

import pytest
import torch


def pytest_configure(config):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


@pytest.fixture(autouse=True)
def an_idle_machine(monkeypatch):
    """The machine reads as idle, at once (cost_model.busy_cores: no core busy with other work; the load average, kept
    for the record, 0): what the tools say of a busy machine is tested with a load a test gives them, never with
    whatever else runs on this machine (the suite's own workers included)."""
    monkeypatch.setattr("cost_model.busy_cores", lambda *args, **kwargs: 0.0)    # by name: conftest imports none
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
