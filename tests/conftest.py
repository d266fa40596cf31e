"""Shared pytest fixtures."""
import pytest
import torch


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
