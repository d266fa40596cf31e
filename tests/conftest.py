"""Shared pytest fixtures and the device switch of the tests/test_device_*.py cases."""
import os

import pytest
import torch

DEVICE_ENV = "AGENT_ATTENTION_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=None,
        help=f"device of the tests/test_device_*.py cases: cuda (default; skipped without CUDA), cuda:N or cpu "
             f"(also the environment variable {DEVICE_ENV})",
    )


@pytest.fixture(scope="session")
def test_device(request) -> torch.device:
    """The device the tests/test_device_*.py cases run on: ``--device`` or $AGENT_ATTENTION_TEST_DEVICE,
    default ``cuda``. Without CUDA the CUDA cases skip (the CPU suite stays as it is)."""
    name = request.config.getoption("--device") or os.environ.get(DEVICE_ENV) or "cuda"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise pytest.UsageError(f"--device/{DEVICE_ENV}: not a torch device: {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip(f"CUDA is not available (device tests run on {name}; choose one with --device or {DEVICE_ENV})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            pytest.skip(f"{name} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        pytest.skip(f"device {name} is not covered by these tests (cpu or cuda)")
    return device


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the test: the tiny models of these tests gain nothing from more, and
    on a shared 2-core machine several threads per process thrash (measured ~8x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _no_weight_downloads(tmp_path_factory):
    """No test reaches the internet or the user's cache through ``pretrained=True``: the weight cache
    is a temp folder and the release URLs point at a closed loopback port (tests that download
    set up their own loopback server)."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    old = {k: os.environ.get(k) for k in ("AGENT_ATTENTION_CACHE", "AGENT_ATTENTION_WEIGHTS_URL")}
    os.environ["AGENT_ATTENTION_CACHE"] = str(tmp_path_factory.mktemp("weights-cache"))
    os.environ["AGENT_ATTENTION_WEIGHTS_URL"] = f"http://127.0.0.1:{port}/f/{{id}}/?dl=1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
