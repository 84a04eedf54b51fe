"""Datasets for proxy training: the embedded `synthetic` set and ImageNet-style folders.

`--dataset` takes `synthetic` (generated here, deterministic from a seed, no download), a folder
laid out as ImageNet / ImageFolder (`train/<class>/*.JPEG`, optional `val/<class>/*`; without `val/`
a share of each class is held out), or a prepared set saved by `archlab data ... --export FILE.pt`
(decoded once, copied to a cluster's workers or a GPU box that lacks the image folder). A folder is decoded, centre-cropped and resized once into a
uint8 array cached under `runs/cache/datasets/`, keyed by the folder's file list, the class subset,
the image count and the resolution, so later epochs and runs cost nothing to load.

Unreadable images are skipped and counted (`ImageSet.skipped`), never silently: an empty class,
a missing folder or a set where most images fail is an error.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from archlab.errors import ArchlabError
from archlab.io import cache_dir, save_atomic
from archlab.schema import at_least, check, flag, setting

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
SHAPES = ("disk", "square", "triangle", "ring", "cross")


@dataclass(frozen=True)
class DataConfig:
    """What to load. `spec`: `synthetic` or a folder path."""
    spec: str = "synthetic"
    resolution: int = setting(32, valid=lambda v: v >= 8 and not v & (v - 1), rule="a power of two >= 8")
    classes: int | None = setting(None, valid=at_least(1), rule=">= 1")  # first N classes (sorted); synthetic: 10
    per_class: int | None = setting(None, valid=at_least(1), rule=">= 1")  # train images per class (folder: all;
    # synthetic: 200)
    val_per_class: int | None = setting(None, valid=at_least(1), rule=">= 1")  # folder: all of val/ (or 10% of
    # train); synthetic: 50
    seed: int = 0

    @property
    def is_synthetic(self) -> bool:
        return self.spec == "synthetic"


@dataclass
class ImageSet:
    """uint8 images (N, 3, H, W) with int64 labels, for train and validation."""
    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    class_names: list[str]
    source: str
    key: str  # identifies exactly this data (for caches of reference statistics)
    skipped: int = 0
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return int(self.train.shape[-1])

    def describe(self) -> dict:
        return {"source": self.source, "key": self.key, "classes": self.num_classes, "resolution": self.resolution,
                "train": int(len(self.train)), "val": int(len(self.val)), "skipped": self.skipped, **self.info}


def load_dataset(cfg: DataConfig, progress: bool = False) -> ImageSet:
    check(cfg, label=lambda name: "--image-size" if name == "resolution" else flag(name))
    if cfg.is_synthetic:
        return synthetic(cfg)
    if cfg.spec.endswith(".pt") and Path(cfg.spec).is_file():
        return _prepared(cfg)
    return _folder(cfg, progress)


def check_size(images: int, resolution: int, what: str = "") -> None:
    """Refuse a set whose decoded uint8 array would take over half of this machine's memory, before
    generating or decoding anything (an absurd --image-size or --classes is an error, not a crash)."""
    from archlab.io import memory_bytes

    need, memory = images * 3 * resolution ** 2, memory_bytes()
    if memory and need > memory / 2:
        raise ArchlabError(f"--image-size {resolution}: {images:,} images{what} at {resolution}x{resolution} px take "
                           f"{need / 2 ** 30:,.1f} GiB decoded, more than half of this machine's "
                           f"{memory / 2 ** 30:.1f} GiB; lower --image-size, --classes or --per-class")


def save_dataset(data: ImageSet, path: str | Path) -> Path:
    """Write a prepared set (uint8 tensors, labels, class names, key) that `load_dataset` reads back."""
    return save_atomic({"format": "archlab-imageset-1", "train": data.train, "train_labels": data.train_labels, "val": data.val,
                "val_labels": data.val_labels, "class_names": data.class_names, "source": data.source, "key": data.key,
                "skipped": data.skipped}, path)


PREPARED_KEYS = ("train", "train_labels", "val", "val_labels", "class_names", "source", "key", "skipped")


def _prepared(cfg: DataConfig) -> ImageSet:
    try:
        d = torch.load(cfg.spec, weights_only=True)
    except Exception:  # not a torch file, or one holding more than tensors and plain data
        d = None
    if not isinstance(d, dict) or d.get("format") != "archlab-imageset-1" or any(k not in d for k in PREPARED_KEYS):
        raise ArchlabError(f"--dataset: {cfg.spec} is not a prepared archlab dataset (archlab data ... --export)")
    res = int(d["train"].shape[-1])
    if res != cfg.resolution:
        raise ArchlabError(f"--image-size: {cfg.resolution}, but {cfg.spec} was prepared at {res}")
    data = ImageSet(d["train"], d["train_labels"], d["val"], d["val_labels"], list(d["class_names"]), d["source"],
                    d["key"], int(d["skipped"]), {"prepared": cfg.spec})
    if cfg.classes or cfg.per_class or cfg.val_per_class:
        data = _subset(data, cfg)
    return data


def _subset(data: ImageSet, cfg: DataConfig) -> ImageSet:
    k = cfg.classes or data.num_classes
    if k > data.num_classes:
        raise ArchlabError(f"--classes: {k} asked, the prepared set has {data.num_classes}")

    def pick(labels: torch.Tensor, limit: int | None) -> torch.Tensor:
        keep = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(k):
            idx = (labels == c).nonzero().flatten()
            keep[idx[:limit]] = True
        return keep

    t, v = pick(data.train_labels, cfg.per_class), pick(data.val_labels, cfg.val_per_class)
    key = f"{data.key}-k{k}-n{cfg.per_class}-v{cfg.val_per_class}"
    return ImageSet(data.train[t], data.train_labels[t], data.val[v], data.val_labels[v], data.class_names[:k],
                    data.source, key, data.skipped, data.info)


# ---- synthetic ----------------------------------------------------------------------------------

def synthetic(cfg: DataConfig) -> ImageSet:
    """A class-conditional set of shapes: class = (shape, colour scheme); images vary in position,
    size, rotation, hue, background gradient and noise. Deterministic from `cfg.seed`."""
    k = cfg.classes or 10
    n_train, n_val = cfg.per_class or 200, cfg.val_per_class or 50
    check_size(k * (n_train + n_val), cfg.resolution, f" (--classes {k} x {n_train} train + {n_val} validation)")
    rng = np.random.default_rng(cfg.seed)
    res = cfg.resolution
    imgs, labels = [], []
    for c in range(k):
        for _ in range(n_train + n_val):
            imgs.append(_render(c, k, res, rng))
            labels.append(c)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(labels)
    per = n_train + n_val
    is_val = (torch.arange(len(y)) % per) >= n_train
    names = [f"{SHAPES[c % len(SHAPES)]}-{c // len(SHAPES)}" for c in range(k)]
    key = f"synthetic-k{k}-n{n_train}-v{n_val}-r{res}-s{cfg.seed}-v1"
    return ImageSet(x[~is_val], y[~is_val], x[is_val], y[is_val], names, "synthetic", key)


def _render(c: int, k: int, res: int, rng: np.random.Generator) -> np.ndarray:
    shape = SHAPES[c % len(SHAPES)]
    scheme = c // len(SHAPES)
    hue = (scheme * 0.37 + 0.11 * (c % len(SHAPES)) + rng.normal(0, 0.02)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, 0.75 + 0.2 * rng.random(), 0.85 + 0.15 * rng.random()))
    bg_hue = (hue + 0.5) % 1.0
    bg0 = np.array(colorsys.hsv_to_rgb(bg_hue, 0.35, 0.35 + 0.2 * rng.random()))
    bg1 = np.array(colorsys.hsv_to_rgb((bg_hue + 0.1) % 1.0, 0.35, 0.6 + 0.2 * rng.random()))
    yy, xx = (np.mgrid[0:res, 0:res] + 0.5) / res * 2 - 1  # [-1, 1]
    angle = rng.uniform(0, 2 * np.pi)
    grad = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    img = bg0 * (1 - grad[..., None]) + bg1 * grad[..., None]
    cx, cy = rng.uniform(-0.35, 0.35, size=2)
    size = rng.uniform(0.3, 0.55)
    rot = rng.uniform(0, np.pi / 2)
    u = ((xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)) / size
    v = (-(xx - cx) * np.sin(rot) + (yy - cy) * np.cos(rot)) / size
    r = np.hypot(u, v)
    if shape == "disk":
        sd = r - 1
    elif shape == "square":
        sd = np.maximum(np.abs(u), np.abs(v)) - 0.8
    elif shape == "triangle":
        sd = np.maximum.reduce([v - 0.6, -0.866 * u - 0.5 * v - 0.6, 0.866 * u - 0.5 * v - 0.6])
    elif shape == "ring":
        sd = np.abs(r - 0.75) - 0.25
    else:  # cross
        sd = np.minimum(np.maximum(np.abs(u) - 1, np.abs(v) - 0.3), np.maximum(np.abs(u) - 0.3, np.abs(v) - 1))
    alpha = np.clip(0.5 - sd * size * res / 2, 0, 1)[..., None]  # ~1 px anti-aliased edge
    img = img * (1 - alpha) + fg * alpha + rng.normal(0, 0.025, size=img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# ---- folders ------------------------------------------------------------------------------------

def _list_classes(split: Path) -> list[Path]:
    return sorted(p for p in split.iterdir() if p.is_dir())


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _folder(cfg: DataConfig, progress: bool) -> ImageSet:
    root = Path(cfg.spec)
    if not root.is_dir():
        raise ArchlabError(f"--dataset: {cfg.spec!r} is neither `synthetic` nor an existing folder")
    train_dir = root / "train" if (root / "train").is_dir() else root
    class_dirs = _list_classes(train_dir)
    if not class_dirs:
        raise ArchlabError(f"--dataset: {train_dir} has no class folders (expected train/<class>/<images>)")
    if cfg.classes:
        if cfg.classes > len(class_dirs):
            raise ArchlabError(f"--classes: {cfg.classes} asked, {train_dir} has {len(class_dirs)}")
        class_dirs = class_dirs[:cfg.classes]
    val_root = root / "val" if (root / "val").is_dir() and train_dir != root else None
    files: dict[str, tuple[list[Path], list[Path]]] = {}
    held_out = []  # classes that val/ lacks: validated on images held out of their training set
    for d in class_dirs:
        train = _images(d)
        if not train:
            raise ArchlabError(f"--dataset: class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        val = _images(val_root / d.name) if val_root is not None and (val_root / d.name).is_dir() else []
        if not val:  # no val/ split, or none for this class: hold out 10% of the class (at least one image)
            n_val = max(1, len(train) // 10)
            train, val = train[:-n_val], train[-n_val:]
            if val_root is not None:
                held_out.append(d.name)
        if not train:
            raise ArchlabError(f"--dataset: class folder {d} has {len(val)} image(s), all held out for validation: "
                               "no training images left")
        if cfg.per_class:
            train = train[:cfg.per_class]
        if cfg.val_per_class:
            val = val[:cfg.val_per_class]
        files[d.name] = (train, val)
    listing = json.dumps({c: [[str(p), p.stat().st_size] for p in t + v] for c, (t, v) in files.items()})
    key = hashlib.sha1(f"{root.resolve()}|{cfg.resolution}|{listing}".encode()).hexdigest()[:16]
    cache = cache_dir() / "datasets" / f"{root.name}-{key}.pt"
    names = list(files)
    if cache.is_file():
        d = torch.load(cache)
    else:
        check_size(sum(len(t) + len(v) for t, v in files.values()), cfg.resolution)
        d = _decode(files, cfg.resolution, progress)
        save_atomic(d, cache)
    info = {"cache": str(cache), "classes_used": names[:5] + (["..."] if len(names) > 5 else [])}
    if held_out:
        info["val_held_out_from_train"] = f"{len(held_out)} classes without val/<class>/ images: " + ", ".join(held_out[:5]) + (
            ", ..." if len(held_out) > 5 else "")
    return ImageSet(d["train"], d["train_labels"], d["val"], d["val_labels"], names, str(root),
                    f"{root.name}-{key}", d["skipped"], info)


def _decode(files: dict, res: int, progress: bool) -> dict:
    from PIL import Image
    from tqdm import tqdm

    out = {"train": [], "train_labels": [], "val": [], "val_labels": []}
    skipped, total = 0, sum(len(t) + len(v) for t, v in files.values())
    bar = tqdm(total=total, desc="decoding images", unit="img", disable=not progress)
    for label, (train, val) in enumerate(files.values()):
        for split, paths in (("train", train), ("val", val)):
            for p in paths:
                bar.update()
                try:
                    with Image.open(p) as im:
                        arr = _square(im.convert("RGB"), res)
                except (OSError, ValueError, Image.DecompressionBombError):  # unreadable, or over PIL's pixel limit
                    skipped += 1
                    continue
                out[split].append(arr)
                out[f"{split}_labels"].append(label)
    bar.close()
    if skipped > total // 2:
        raise ArchlabError(f"--dataset: {skipped} of {total} images could not be read")
    for split in ("train", "val"):
        if not out[split]:
            raise ArchlabError(f"--dataset: no readable {split} images")
    empty = [name for label, name in enumerate(files) if label not in set(out["train_labels"])]
    if empty:
        raise ArchlabError(f"--dataset: class {empty[0]} has no readable training images")
    return {"train": torch.from_numpy(np.stack(out["train"])).permute(0, 3, 1, 2).contiguous(),
            "train_labels": torch.tensor(out["train_labels"]),
            "val": torch.from_numpy(np.stack(out["val"])).permute(0, 3, 1, 2).contiguous(),
            "val_labels": torch.tensor(out["val_labels"]), "skipped": skipped}


def _square(im, res: int) -> np.ndarray:
    """Centre crop to a square, resize to res x res (area filter), HWC uint8."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(im.resize((res, res), Image.Resampling.BOX if s >= 2 * res else Image.Resampling.BICUBIC))


def to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x.float() / 127.5 - 1


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8)


