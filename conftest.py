"""pytest's setup for this folder. With `pytest -n N` (pytest-xdist), the N workers' torch threads add up to the
cores this machine gives the suite, as one process's threads do without it."""
import os
import types

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


# A child's Ctrl-C as a terminal's: SIGINT caught by Python, whatever the test worker that starts the child ignores or
# blocks (a child inherits both, and Python installs no handler for a signal ignored when it starts).
AS_AT_A_TERMINAL = ("import signal; signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
                    "signal.signal(signal.SIGINT, signal.default_int_handler); ")


def signal_state(pid):
    """The signal masks of a process as /proc shows them (blocked, ignored, caught; hexadecimal), for a failure's
    message: a child that did not stop at Ctrl-C shows why."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return [line.strip() for line in f if line.startswith(("SigBlk", "SigIgn", "SigCgt"))]
    except OSError:
        return "gone"


@pytest.fixture
def ctrl_c():
    """For a test that sends Ctrl-C to a child: .code, Python code that gives the child a terminal's SIGINT (first in
    its `python -c`), and .signals(pid), the child's signal masks for a failure's message."""
    return types.SimpleNamespace(code=AS_AT_A_TERMINAL, signals=signal_state)
