"""``agent-attention show``: what the agents of one block look at, drawn over an image.

Runs the model once on the image, captures the projected queries and keys that the chosen
:class:`~agent_attention.layers.AgentAttention` block receives, and recomputes its two attention
maps with :func:`agent_attention.functional.agent_feature_maps`:

* agent → token (``φk``): where each agent gathers its value from; one heat map per chosen agent;
* token → agent (``φq``): which agent each token reads from; drawn as the agent of largest weight.

The agents are adaptive-average pools of the queries over a ``p × p`` grid of cells; the cells are
drawn over the image. Blocks are named ``stage.index`` (stage from 1, index from 0 within the
stage, in call order), by module name (``block1.0.attn``) or by their overall number; see
``--list-blocks``. Without ``--checkpoint`` the weights are random and the maps say nothing about
a trained model (the figure says so).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from ._atomic import atomic_path
from .functional import agent_feature_maps
from .layers import AgentAttentionCore, to_2tuple_hw

__all__ = ["AgentCall", "load_image", "capture_agent_calls", "select_call", "agent_maps", "draw"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AgentCall:
    """One call of an agent attention block during a forward pass."""

    name: str
    module: AgentAttentionCore
    number: int  # overall position among the calls
    stage: int = 0  # 1-based, grouped by the token grid
    index: int = 0  # 0-based within the stage
    hw: Tuple[int, int] = (0, 0)
    image_batch: int = 1  # images in the forward pass (more rows in q: windows or stripes)
    q: Optional[Tensor] = None
    k: Optional[Tensor] = None
    v: Optional[Tensor] = None
    kwargs: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.stage}.{self.index}"


# --------------------------------------------------------------------------- image
def load_image(path: Optional[str], size: int, keep_aspect: bool = False, multiple: int = 32) -> np.ndarray:
    """RGB ``uint8``: shorter side resized to ``size``; then a centre crop to ``(size, size, 3)``, or
    with ``keep_aspect`` the whole image (the longer side rounded to a multiple of ``multiple``, so
    a non-square photo is neither squashed nor cropped: the models take any H × W).

    ``path=None`` uses scikit-image's sample photo ``astronaut``.
    """
    from PIL import Image

    if path is None:
        from ._extras import require

        require("skimage.data", "agent-attention show without --image (the sample photo)", "viz")
        from skimage import data

        img = Image.fromarray(data.astronaut())
    else:
        if not os.path.isfile(path):
            raise ValueError(f"--image: no such file {path!r}")
        try:
            img = Image.open(path).convert("RGB")
        except OSError as e:
            raise ValueError(f"--image: cannot read {path!r} as an image ({e})") from None
    w, h = img.size
    s = size / min(w, h)
    if keep_aspect:
        def side(n: int) -> int:
            return size if n == min(w, h) else max(size, multiple * round(n * s / multiple))

        return np.asarray(img.resize((side(w), side(h)), Image.BICUBIC))
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def _to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(255)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


# --------------------------------------------------------------------------- capture
@torch.no_grad()
def capture_agent_calls(model: nn.Module, x: Tensor) -> List[AgentCall]:
    """Run ``model(x)`` and record, for every agent attention call, its grid and projected q, k, v."""
    calls: List[AgentCall] = []
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, AgentAttentionCore):
            continue

        def record(module, q, k, v, hw, kw, _name=name):
            calls.append(AgentCall(_name, module, len(calls), hw=to_2tuple_hw(hw), image_batch=x.shape[0],
                                   q=q.detach(), k=k.detach(), v=v.detach(), kwargs=dict(kw)))

        handles.append(mod.register_attend_hook(record))
    if not handles:
        raise ValueError(f"{type(model).__name__} has no AgentAttention block to show")
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    stage, index, last = 0, 0, None
    for c in calls:  # stages: runs of calls on the same token grid
        if c.hw != last:
            stage, index, last = stage + 1, 0, c.hw
        c.stage, c.index = stage, index
        index += 1
    return calls


def select_call(calls: List[AgentCall], spec: str) -> AgentCall:
    """``'2.1'`` (stage.index), ``'block1.0.attn'`` (module name) or ``'5'`` (overall number)."""
    spec = str(spec).strip()
    for c in calls:
        if spec in (c.label, c.name) or spec == str(c.number):
            return c
    known = ", ".join(f"{c.label} ({c.name})" for c in calls)
    raise ValueError(f"--block {spec!r} not found; agent blocks of this model: {known}")


@torch.no_grad()
def agent_maps(call: AgentCall, head: Optional[int] = None) -> Dict[str, object]:
    """Attention maps of a captured call for the first image of the batch.

    Returns ``agent_to_token (H, W, n)`` (each agent's softmax over the grid tokens, prefix tokens
    dropped), ``token_to_agent (H, W, n)`` (each token's softmax over the agents), ``agent_grid``
    and ``hw``. ``head=None`` averages the heads.
    """
    m, q, k = call.module, call.q, call.k
    H, W = call.hw
    P = m.num_prefix_tokens
    if q.shape[1] != P + H * W or k.shape[1] != q.shape[1]:
        raise ValueError(f"block {call.name} is not a self-attention over its {H}x{W} grid; cannot draw it")
    if q.shape[0] != call.image_batch or call.kwargs.get("key_padding_mask") is not None:
        raise ValueError(
            f"block {call.name} attends within windows or stripes ({q.shape[0]} groups of {H}x{W} tokens for "
            f"{call.image_batch} image(s)); only blocks that attend over the whole feature map can be drawn")
    grid = to_2tuple_hw(m.agent_shape, "agent_shape")
    t = m.attention_inputs(q, k, call.v, (H, W))  # exactly what attend passes to the op
    h = m.num_heads
    phi_q, phi_k = agent_feature_maps(t.q, t.k, t.agents, agent_bias=t.agent_bias, query_bias=t.query_bias, scale=m.scale)
    if head is not None and not 0 <= head < h:
        raise ValueError(f"--head must be in [0, {h}) for block {call.name}, got {head}")
    pick = (lambda t: t[0, head]) if head is not None else (lambda t: t[0].mean(0))
    n = t.agents.shape[2]
    return {
        "agent_to_token": pick(phi_k)[P:].reshape(H, W, n).float().cpu().numpy(),
        "token_to_agent": pick(phi_q)[P:].reshape(H, W, n).float().cpu().numpy(),
        "agent_grid": grid,
        "hw": (H, W),
    }


# --------------------------------------------------------------------------- drawing
def _cells(hw: Tuple[int, int], grid: Tuple[int, int], size):
    """Pixel boxes ``(x0, y0, x1, y1)`` of the adaptive-pool bins, agent order (row-major);
    ``size``: the image's ``(height, width)`` in pixels (an int: square)."""
    (H, W), (gh, gw) = hw, grid
    height, width = (size, size) if isinstance(size, int) else size
    sy, sx = height / H, width / W
    boxes = []
    for i in range(gh):
        y0, y1 = math.floor(i * H / gh), math.ceil((i + 1) * H / gh)
        for j in range(gw):
            x0, x1 = math.floor(j * W / gw), math.ceil((j + 1) * W / gw)
            boxes.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return boxes


def _agent_colors(grid: Tuple[int, int]) -> np.ndarray:
    """``(n, 3)`` RGB per agent: red grows down the agent grid, blue to the right (a 2-D colour key)."""
    gh, gw = grid
    i, j = np.meshgrid(np.linspace(0, 1, gh), np.linspace(0, 1, gw), indexing="ij")
    rgb = np.stack([0.15 + 0.85 * i, 0.55 - 0.35 * (i * j), 0.15 + 0.85 * j], axis=-1)
    return rgb.reshape(-1, 3)


def draw(image: np.ndarray, maps: Dict[str, object], agents: Sequence[int], title: str, path: Path) -> Path:
    """Image with the agent cells, the token → agent assignment and one heat map per agent."""
    from ._extras import require

    require("matplotlib", "agent-attention show (drawing the maps)", "viz")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    height, width = image.shape[:2]
    a2t, t2a = maps["agent_to_token"], maps["token_to_agent"]
    H, W, n = a2t.shape
    boxes = _cells(maps["hw"], maps["agent_grid"], (height, width))
    colors = _agent_colors(maps["agent_grid"])
    panels = 2 + len(agents)
    ncols = math.ceil(panels / math.ceil(panels / 4))
    nrows = math.ceil(panels / ncols)
    aspect = width / height  # panels keep the image's shape
    fig = Figure(figsize=(3.6 * ncols * max(1.0, aspect), 3.5 * nrows / min(1.0, aspect) + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    extent = (0, width, height, 0)
    gray = image.astype(np.float32).mean(-1) / 255.0

    ax = axes[0]
    ax.imshow(image, extent=extent)
    for a, (x0, y0, x1, y1) in enumerate(boxes):
        chosen = a in agents
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fc=(*colors[a], 0.25), ec="white", lw=0.8))
        if chosen:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=2.2))
        if n <= 64:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, str(a), color="yellow" if chosen else "white", ha="center",
                    va="center", fontsize=9 if n <= 16 else 6, fontweight="bold",
                    bbox=dict(facecolor=colors[a], alpha=0.8, pad=1, lw=0))
    ax.set_title(f"agents: queries average-pooled\nover {maps['agent_grid'][0]}×{maps['agent_grid'][1]} cells", fontsize=9)

    ax = axes[1]
    ax.imshow(gray, extent=extent, cmap="gray", vmin=0, vmax=1)
    ax.imshow(colors[t2a.argmax(-1)], extent=extent, alpha=0.6, interpolation="nearest")
    ax.set_title("token → agent: colour of the agent\neach token reads most from", fontsize=9)

    for ax, a in zip(axes[2:], agents):
        rel = a2t[..., a] * (H * W)  # 1 = uniform attention over the grid
        ax.imshow(gray, extent=extent, cmap="gray", vmin=0, vmax=1)
        im = ax.imshow(rel, extent=extent, cmap="inferno", alpha=0.65, interpolation="bilinear")
        x0, y0, x1, y1 = boxes[a]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=1.8, ec="cyan", ls="--"))
        ax.set_title(f"agent {a} → tokens (its cell dashed)", fontsize=9)
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        cb.set_label("weight × number of tokens (1 = uniform)", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path
