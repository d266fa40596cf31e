"""Datasets for detection and segmentation.

* :class:`ShapesDetection` / :class:`ShapesSegmentation`: an embedded, generated data set (circles,
  squares and triangles of random colour and size on a noisy background). Every image is a pure
  function of ``(seed, index)``, so the same arguments give the same pixels and labels on every
  machine; nothing is downloaded. :func:`shapes_coco_gt` exports its ground truth in COCO format
  for ``pycocotools`` evaluation.
* :class:`CocoFolder`: a COCO-format folder (``annotations/instances_<split>.json`` + images).
* :class:`ADE20KFolder`: an ADE20K-format folder (``images/<split>/*.jpg`` +
  ``annotations/<split>/*.png``; label 0 = "other" is ignored and 1..150 become 0..149, as mmseg's
  ``reduce_zero_label``).

Images are returned as float tensors in ``[0, 1]`` of shape ``(3, H, W)``; the models normalise.
Detection targets follow torchvision's convention (``boxes`` xyxy float, ``labels`` int64 starting
at 1, ``masks`` uint8 ``(N, H, W)``); segmentation labels are int64 ``(H, W)`` with 255 = ignore.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._atomic import write_json

SHAPE_CLASSES = ("circle", "square", "triangle")
IGNORE_INDEX = 255


# --------------------------------------------------------------------------- the shapes generator
def _shape_mask(kind: int, cx: float, cy: float, size: float, hw: Tuple[int, int], flip: bool) -> np.ndarray:
    H, W = hw
    yy = np.arange(H, dtype=np.float32)[:, None] + 0.5  # pixel centres
    xx = np.arange(W, dtype=np.float32)[None, :] + 0.5
    r = size / 2
    if kind == 0:  # circle
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == 1:  # axis-aligned square
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    # isosceles triangle with a horizontal base, apex up (or down when flipped)
    t = (yy - (cy - r)) / (2 * r)  # 0 at the apex row, 1 at the base row
    if flip:
        t = 1 - t
    return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= r * t)


def make_shapes_sample(seed: int, index: int, image_size: Tuple[int, int] = (96, 96), max_shapes: int = 4):
    """One generated sample: ``(image float32 (H, W, 3) in [0, 1], instances)``.

    ``instances`` is a list of ``(label 1..3, bool mask (H, W))``; shapes never overlap, so the
    semantic map is the union of the instance masks. Deterministic in ``(seed, index)``.
    """
    H, W = image_size
    rng = np.random.default_rng([int(seed), int(index)])
    bg = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
    ramp = np.linspace(-0.1, 0.1, W, dtype=np.float32)[None, :, None] * rng.choice([-1.0, 1.0])
    image = np.clip(bg + ramp + rng.normal(0, 0.04, size=(H, W, 3)).astype(np.float32), 0, 1)
    occupied = np.zeros((H, W), dtype=bool)
    instances: List[Tuple[int, np.ndarray]] = []
    short = min(H, W)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(0, len(SHAPE_CLASSES)))
        color = rng.uniform(0, 1, size=3).astype(np.float32)
        while np.abs(color - bg).sum() < 0.6:  # keep shapes visible against the background
            color = rng.uniform(0, 1, size=3).astype(np.float32)
        for _attempt in range(20):
            size = float(rng.uniform(0.15, 0.4) * short)
            cx = float(rng.uniform(size / 2 + 1, W - size / 2 - 1))
            cy = float(rng.uniform(size / 2 + 1, H - size / 2 - 1))
            mask = _shape_mask(kind, cx, cy, size, (H, W), flip=bool(rng.integers(0, 2)))
            if mask.sum() >= 16 and not (mask & occupied).any():
                break
        else:
            continue
        occupied |= np.pad(mask, 2)[:-4, 2:-2] | np.pad(mask, 2)[4:, 2:-2] | mask  # a small margin
        shade = color + rng.normal(0, 0.03, size=(H, W, 3)).astype(np.float32)
        image[mask] = np.clip(shade[mask], 0, 1)
        instances.append((kind + 1, mask))
    return image.astype(np.float32), instances


def _box_of(mask: np.ndarray) -> List[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class _ShapesBase(Dataset):
    def __init__(self, num_images: int = 512, image_size: Sequence[int] = (96, 96), seed: int = 0,
                 max_shapes: int = 4, train: bool = False):
        if num_images <= 0:
            raise ValueError(f"num_images must be positive, got {num_images}")
        self.num_images, self.seed, self.max_shapes, self.train = int(num_images), int(seed), int(max_shapes), train
        H, W = (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if min(H, W) < 32:
            raise ValueError(f"image_size must be at least 32x32, got {(H, W)}")
        self.image_size = (H, W)
        self._cache: Dict[int, tuple] = {}
        self.classes = ("background",) + SHAPE_CLASSES

    def __len__(self) -> int:
        return self.num_images

    def sample(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if index not in self._cache:
            self._cache[index] = make_shapes_sample(self.seed, index, self.image_size, self.max_shapes)
        return self._cache[index]

    def _flip(self, index: int) -> bool:
        # Flips vary between epochs: Python's RNG, seeded per (seed, epoch, index) by the training loop
        # (dense.engine.EpochSeeded).
        return self.train and random.random() < 0.5


class ShapesDetection(_ShapesBase):
    """Generated detection/instance-segmentation data set (torchvision target dicts)."""

    def __getitem__(self, index: int):
        image, instances = self.sample(index)
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        masks = torch.from_numpy(np.stack([m for _, m in instances])).to(torch.uint8)
        labels = torch.tensor([c for c, _ in instances], dtype=torch.int64)
        boxes = torch.tensor([_box_of(m) for _, m in instances], dtype=torch.float32)
        if self._flip(index):
            img, masks = img.flip(-1), masks.flip(-1)
            W = img.shape[-1]
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
        target = {
            "boxes": boxes, "labels": labels, "masks": masks,
            "image_id": index, "area": masks.flatten(1).sum(1).float(),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        return img, target


class ShapesSegmentation(_ShapesBase):
    """Generated semantic segmentation data set: label 0 = background, 1..3 = shape classes."""

    num_classes = 1 + len(SHAPE_CLASSES)

    def __getitem__(self, index: int):
        image, instances = self.sample(index)
        label = np.zeros(self.image_size, dtype=np.int64)
        for c, m in instances:
            label[m] = c
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        lab = torch.from_numpy(label)
        if self._flip(index):
            img, lab = img.flip(-1), lab.flip(-1)
        return img, lab


def shapes_coco_gt(dataset: ShapesDetection) -> dict:
    """The ground truth of a :class:`ShapesDetection` set as a COCO ``instances`` dict (RLE masks)."""
    from pycocotools import mask as mask_utils

    H, W = dataset.image_size
    images, anns = [], []
    for i in range(len(dataset)):
        images.append({"id": i, "width": W, "height": H, "file_name": f"shapes_{dataset.seed}_{i:06d}.png"})
        for label, m in dataset.sample(i)[1]:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x0, y0, x1, y1 = _box_of(m)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": float(m.sum()), "iscrowd": 0, "segmentation": rle})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(SHAPE_CLASSES)]
    return {"images": images, "annotations": anns, "categories": cats}


# --------------------------------------------------------------------------- COCO-format folders
def _find_coco_images(root: Path, split: str) -> Path:
    for cand in (root / split, root / "images" / split, root / "images"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"no image folder for split {split!r} under {root} (tried {split}/, images/{split}/, images/)")


class CocoFolder(Dataset):
    """A COCO-format folder: ``<root>/annotations/instances_<split>.json`` and the images of the split.

    Category ids are mapped to contiguous labels ``1..K`` (``label_to_cat[label]`` gives the COCO
    id back for evaluation). Crowd annotations and degenerate boxes are dropped from the training
    targets (the evaluation uses the full annotation file).
    """

    def __init__(self, root: str, split: str = "train2017", train: bool = False):
        from torchvision.datasets import CocoDetection

        root_p = Path(root)
        ann = root_p / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {ann}")
        self.ds = CocoDetection(str(_find_coco_images(root_p, split)), str(ann))
        self.coco = self.ds.coco
        cat_ids = sorted(self.coco.getCatIds())
        self.label_to_cat = [0] + cat_ids
        self.cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.classes = ("background",) + tuple(self.coco.cats[c]["name"] for c in cat_ids)
        self.train = train
        if train:  # like torchvision's references: skip images without usable annotations
            keep = []
            for k, img_id in enumerate(self.ds.ids):
                anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=False))
                if any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in anns):
                    keep.append(k)
            self.indices = keep
        else:
            self.indices = list(range(len(self.ds.ids)))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        pil, anns = self.ds[self.indices[index]]
        img_id = self.ds.ids[self.indices[index]]
        W, H = pil.size
        img = torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        anns = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
        masks = (torch.from_numpy(np.stack([self.coco.annToMask(a) for a in anns])) if anns
                 else torch.zeros(0, H, W, dtype=torch.uint8))
        target = {"boxes": boxes, "labels": torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
                  "masks": masks, "image_id": img_id,
                  "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
                  "iscrowd": torch.zeros(len(anns), dtype=torch.int64)}
        if self.train and random.random() < 0.5:
            img, target["masks"] = img.flip(-1), target["masks"].flip(-1)
            b = target["boxes"]
            target["boxes"] = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], dim=1)
        return img, target


# --------------------------------------------------------------------------- ADE20K-format folders
class ADE20KFolder(Dataset):
    """ADE20K-format folder (``ADEChallengeData2016`` layout), 150 classes after ``reduce_zero_label``.

    Training (mmseg's recipe, without photometric distortion): random rescale of the
    ``scale=(2048, 512)`` keep-ratio size by a factor in ``ratio_range``, random crop of
    ``crop_size`` (padded with ignore), random horizontal flip. Evaluation: keep-ratio resize to
    fit ``scale``; the label keeps its original size (the engine resizes logits back).
    """

    num_classes = 150

    def __init__(self, root: str, split: str = "training", train: bool = False, crop_size: int = 512,
                 scale: Tuple[int, int] = (2048, 512), ratio_range: Tuple[float, float] = (0.5, 2.0),
                 reduce_zero_label: bool = True):
        root_p = Path(root)
        img_dir, ann_dir = root_p / "images" / split, root_p / "annotations" / split
        if not img_dir.is_dir() or not ann_dir.is_dir():
            raise FileNotFoundError(f"ADE20K folder needs {img_dir} and {ann_dir}")
        self.items = []
        for p in sorted(img_dir.iterdir()):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                lab = ann_dir / (p.stem + ".png")
                if lab.is_file():
                    self.items.append((p, lab))
        if not self.items:
            raise FileNotFoundError(f"no image/label pairs found in {img_dir} and {ann_dir}")
        self.train, self.crop_size, self.scale = train, int(crop_size), tuple(scale)
        self.ratio_range, self.reduce_zero_label = tuple(ratio_range), reduce_zero_label

    def __len__(self) -> int:
        return len(self.items)

    def _keep_ratio_size(self, h: int, w: int, ratio: float = 1.0) -> Tuple[int, int]:
        long_s, short_s = max(self.scale) * ratio, min(self.scale) * ratio
        f = min(long_s / max(h, w), short_s / min(h, w))
        return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))

    def __getitem__(self, index: int):
        from PIL import Image

        ip, lp = self.items[index]
        img = torch.from_numpy(np.asarray(Image.open(ip).convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
        lab = torch.from_numpy(np.asarray(Image.open(lp), dtype=np.int64).copy())
        if self.reduce_zero_label:
            lab = torch.where(lab == 0, torch.full_like(lab, IGNORE_INDEX), lab - 1)
        H, W = img.shape[-2:]
        if not self.train:
            size = self._keep_ratio_size(H, W)
            return F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0], lab
        size = self._keep_ratio_size(H, W, random.uniform(*self.ratio_range))
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
        lab = F.interpolate(lab[None, None].float(), size=size, mode="nearest")[0, 0].long()
        c = self.crop_size
        ph, pw = max(c - size[0], 0), max(c - size[1], 0)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph))
            lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE_INDEX)
        y = random.randint(0, img.shape[1] - c)
        x = random.randint(0, img.shape[2] - c)
        img, lab = img[:, y:y + c, x:x + c], lab[y:y + c, x:x + c]
        if random.random() < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img.contiguous(), lab.contiguous()


def detection_collate(batch):
    """Lists of images and targets (the detectors take lists of any-size images)."""
    return tuple(zip(*batch))


def segmentation_collate(batch):
    """Stack equal-size samples; pad unequal ones (image 0, label ignore) to the largest size."""
    imgs, labs = zip(*batch)
    H = max(i.shape[1] for i in imgs)
    W = max(i.shape[2] for i in imgs)
    imgs = [F.pad(i, (0, W - i.shape[2], 0, H - i.shape[1])) for i in imgs]
    labs = [F.pad(lab, (0, W - lab.shape[1], 0, H - lab.shape[0]), value=IGNORE_INDEX) for lab in labs]
    return torch.stack(imgs), torch.stack(labs)


def write_coco_json(coco: dict, path: str) -> None:
    """Write a COCO dict atomically (temp file + ``os.replace``)."""
    write_json(path, coco)
