"""Test helpers for the pretrained-weights tests: a loopback HTTP server and files with the official structure.

No test needs the internet: the server listens on 127.0.0.1 (an ephemeral port) and serves what
the test registers: a file, an HTTP status, or a body cut short of its ``Content-Length``.
"""
from __future__ import annotations

import http.server
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Union

import torch
from reference_utils import manifest


def fake_yacs(monkeypatch):
    """A ``CfgNode`` class that pickles as ``yacs.config.CfgNode`` (yacs need not be installed)."""

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    yacs_config.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", yacs)
    monkeypatch.setitem(sys.modules, "yacs.config", yacs_config)
    return CfgNode


def save_official(path: Path, monkeypatch, model_state, *, ema_state=None, name="agent_deit_tiny") -> Path:
    """``torch.save`` a dict structured like the released files: model, optimizer, lr_scheduler,
    max_accuracy, epoch, config (a yacs CfgNode); ``ema_state`` adds ``state_dict_ema``."""
    CfgNode = fake_yacs(monkeypatch)
    cfg = CfgNode({"MODEL": CfgNode({"NAME": name, "TYPE": name.split("_")[1]}),
                   "TRAIN": CfgNode({"EPOCHS": 300, "BASE_LR": 1e-3})})
    ckpt = {"model": model_state, "optimizer": {"state": {}, "param_groups": []},
            "lr_scheduler": {"t_initial": 300}, "max_accuracy": 74.9, "epoch": 299, "config": cfg}
    if ema_state is not None:
        ckpt.update(state_dict_ema=ema_state, max_accuracy_e=75.0)
    torch.save(ckpt, path)
    return path


def official_layout(name: str, value: float = 0.5) -> dict[str, torch.Tensor]:
    """The official keys / shapes / dtypes of a released model (from its manifest), each a stride-0
    view of one number, so ``torch.save`` writes a few KB however large the model."""
    state = {}
    for i, e in enumerate(manifest(name)["state_dict"]):
        dtype = getattr(torch, e["dtype"].replace("torch.", ""))
        state[e["key"]] = torch.full((), (i % 7) if not dtype.is_floating_point else value, dtype=dtype).expand(e["shape"])
    return state


Route = Union[Path, int, tuple[str, Path]]


class LoopbackServer:
    """``http.server`` on 127.0.0.1 in a thread. ``routes[path]`` is a file to serve, an HTTP status
    to answer, or ``("truncate", file)``: a header claiming twice the file's size, then the file."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                route = server.routes.get(self.path, 404)
                if isinstance(route, int):
                    self.send_error(route)
                    return
                truncate = isinstance(route, tuple)
                data = Path(route[1] if truncate else route).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data) * (2 if truncate else 1)))
                self.end_headers()
                self.wfile.write(data)
                if truncate:
                    self.close_connection = True

            def log_message(self, *args):  # keep the test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
