"""Proxy training at tiny sizes: datasets and their cache, the trainer, resume, NaN handling, the
sampler, and the FID/KID plumbing with the small extractor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from archlab import cli
from archlab import train as T
from archlab.config import ArchConfig
from archlab.data import DataConfig, load_dataset
from archlab.errors import ArchlabError
from archlab.metrics import RandConv, features, fid_kid, real_features
from conftest import tiny_dict

TINY_TRAIN = T.TrainConfig(steps=4, batch=8, width_mult=1.0, context_dim=8, context_len=2, samples=0, val_images=16,
                           report_every=2, checkpoint_every=2, warmup=2)


@pytest.fixture(scope="module")
def arch():
    return ArchConfig.from_dict(tiny_dict(stages=[dict(channels=16), dict(channels=32, transformer_depth=1)],
                                          attention=dict(head_dim=8, qk_norm=True, rope=True)))


@pytest.fixture(scope="module")
def data():
    return load_dataset(DataConfig("synthetic", resolution=8, classes=3, per_class=12, val_per_class=6))


# ---- data ---------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_and_class_conditional():
    a = load_dataset(DataConfig(resolution=16, classes=4, per_class=5, val_per_class=2, seed=3))
    b = load_dataset(DataConfig(resolution=16, classes=4, per_class=5, val_per_class=2, seed=3))
    c = load_dataset(DataConfig(resolution=16, classes=4, per_class=5, val_per_class=2, seed=4))
    assert a.train.dtype == torch.uint8 and a.train.shape == (20, 3, 16, 16) and a.val.shape == (8, 3, 16, 16)
    assert torch.equal(a.train, b.train) and not torch.equal(a.train, c.train)
    assert a.train_labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5



def _colour_histogram(x: torch.Tensor) -> torch.Tensor:
    q = (x // 64).long()  # 4 levels per channel -> 64 bins
    idx = q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]
    return torch.stack([torch.bincount(i.flatten(), minlength=64) for i in idx]).float() / idx[0].numel()


def test_synthetic_classes_are_learnable():
    """A nearest-centroid classifier on colour histograms already tells most classes apart (chance: 10%)."""
    d = load_dataset(DataConfig(resolution=32, per_class=30, val_per_class=10))
    h, hv = _colour_histogram(d.train), _colour_histogram(d.val)
    centroids = torch.stack([h[d.train_labels == k].mean(0) for k in range(d.num_classes)])
    accuracy = (torch.cdist(hv, centroids).argmin(1) == d.val_labels).float().mean()
    assert accuracy > 0.5  # colour alone; shape separates the rest


def _write_folder(root, classes=3, per_class=4, bad=0):
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for k in range(classes):
            d = root / split / f"n0{k}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.random((40, 48, 3)) * 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"img{i}.JPEG", format="JPEG")
    for i in range(bad):
        (root / "train" / "n00" / f"broken{i}.JPEG").write_bytes(b"not a jpeg")
    return root


def test_folder_dataset_subsets_resizes_caches_and_counts_skips(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    root = _write_folder(tmp_path / "imgs", bad=1)
    d = load_dataset(DataConfig(str(root), resolution=16, classes=2, per_class=3))
    assert d.class_names == ["n00", "n01"] and d.train.shape == (5, 3, 16, 16)  # 3 + 3 listed, 1 broken
    assert d.skipped == 1 and len(d.val) == 4
    cached = list((tmp_path / "cache" / "datasets").glob("*.pt"))
    assert len(cached) == 1
    again = load_dataset(DataConfig(str(root), resolution=16, classes=2, per_class=3))
    assert torch.equal(again.train, d.train) and again.key == d.key
    other = load_dataset(DataConfig(str(root), resolution=8, classes=2, per_class=3))
    assert other.key != d.key and len(list((tmp_path / "cache" / "datasets").glob("*.pt"))) == 2


def test_folder_dataset_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ArchlabError, match="neither `synthetic` nor an existing folder"):
        load_dataset(DataConfig(str(tmp_path / "missing")))
    root = _write_folder(tmp_path / "imgs")
    (root / "train" / "n09").mkdir()
    with pytest.raises(ArchlabError, match="n09 has no images"):
        load_dataset(DataConfig(str(root)))
    with pytest.raises(ArchlabError, match="--classes: 9 asked"):
        load_dataset(DataConfig(str(root), classes=9))
    with pytest.raises(ArchlabError, match="power of two"):
        load_dataset(DataConfig(resolution=24))


# ---- trainer ------------------------------------------------------------------------------------

def test_proxy_arch_keeps_topology_and_scales_width(arch):
    p = T.proxy_arch(arch, 8, T.TrainConfig(width_mult=0.5, context_dim=8, context_len=2))
    assert p.latent.channels == 3 and p.latent.resolution == 8
    assert [p.channels(i) for i in range(2)] == [8, 16] and [p.heads(i) for i in range(2)] == [arch.heads(i) for i in range(2)]


def test_same_seed_same_run(arch, data):
    a = T.train(arch, data, TINY_TRAIN)
    b = T.train(arch, data, TINY_TRAIN)
    c = T.train(arch, data, T.TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 1}))
    assert a.status == "ok" and a.steps == 4 and a.val_loss > 0
    assert a.val_loss == b.val_loss and a.history == b.history
    assert c.val_loss != a.val_loss


def test_a_training_after_others_in_one_process_equals_it_in_a_fresh_process(arch, data):
    """Ray runs a search's trials one after another in one worker process (reuse_actors): what ran
    before in that process must not change a training."""
    import subprocess
    import sys

    T.train(_other(arch), data, T.TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 3, "samples": 4, "sample_steps": 2,
                                                 "fid_extractor": "randconv"}))
    here = T.train(arch, data, TINY_TRAIN)
    code = ("import json, sys; from archlab import train as T; from archlab.config import ArchConfig; "
            "from archlab.data import DataConfig, load_dataset; a = json.loads(sys.argv[1]); "
            "r = T.train(ArchConfig.from_dict(a['arch']), load_dataset(DataConfig(**a['data'])), T.TrainConfig(**a['train'])); "
            "print(json.dumps([r.val_loss, r.history]))")
    payload = json.dumps({"arch": arch.to_dict(), "data": dict(spec="synthetic", resolution=8, classes=3, per_class=12,
                                                               val_per_class=6), "train": TINY_TRAIN.__dict__})
    fresh = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, check=True)
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == json.loads(json.dumps([here.val_loss, here.history]))


def _other(arch):
    """arch with a different design: no self-attention, separable convs."""
    return arch.with_values({"stages.1.self_attention": False, "stages.*.conv": "separable"}, where="test")


def test_same_seed_same_batches_timesteps_and_noise_across_two_architectures(arch, data, monkeypatch):
    seen = {}
    real = T.draw_batch

    def spy(d, t, step):
        out = real(d, t, step)
        seen.setdefault(id_, []).append(out)
        return out

    monkeypatch.setattr(T, "draw_batch", spy)
    for id_, design in (("a", arch), ("b", _other(arch))):
        T.train(design, data, TINY_TRAIN)
    id_ = "c"
    T.train(arch, data, T.TrainConfig(**{**TINY_TRAIN.__dict__, "seed": 5}))
    assert len(seen["a"]) == len(seen["b"]) == TINY_TRAIN.steps
    for (xa, ya, ta, ea), (xb, yb, tb, eb) in zip(seen["a"], seen["b"]):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ta, tb) and torch.equal(ea, eb)
    assert not torch.equal(seen["a"][0][3], seen["c"][0][3])  # another seed, other noise


def test_shared_init_starts_common_blocks_identically(arch, data):
    a = T.ProxyModel(T.proxy_arch(arch, 8, TINY_TRAIN), 3, init_seed=0).state_dict()
    b = T.ProxyModel(T.proxy_arch(_other(arch), 8, TINY_TRAIN), 3, init_seed=0).state_dict()
    c = T.ProxyModel(T.proxy_arch(arch, 8, TINY_TRAIN), 3, init_seed=1).state_dict()
    common = [k for k in a if k in b and a[k].shape == b[k].shape]
    random = [k for k in common if a[k].std() > 0]  # not the ones and zeros of norms and biases
    assert len(random) > 10 and set(a) - set(b)  # the separable convs are other parameters
    assert all(torch.equal(a[k], b[k]) for k in common)
    assert not any(torch.equal(a[k], c[k]) for k in random)
    # sequential init (one generator in build order): designs share nothing after the first difference
    torch.manual_seed(0)
    s1 = T.ProxyModel(T.proxy_arch(arch, 8, TINY_TRAIN), 3).state_dict()
    torch.manual_seed(0)
    s2 = T.ProxyModel(T.proxy_arch(_other(arch), 8, TINY_TRAIN), 3).state_dict()
    assert not torch.equal(s1["classes.weight"], s2["classes.weight"])


def test_resume_after_an_interruption_is_the_same_run(arch, data, tmp_path):
    straight = T.train(arch, data, TINY_TRAIN)

    def interrupt(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(arch, data, TINY_TRAIN, out=tmp_path, on_report=interrupt)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (tmp_path / "result.json").exists()
    resumed = T.train(arch, data, TINY_TRAIN, out=tmp_path)
    assert resumed.steps == 4 and resumed.val_loss == pytest.approx(straight.val_loss, rel=1e-6)
    assert resumed.history == straight.history
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == 4


def test_checkpoint_from_other_settings_is_refused(arch, data, tmp_path):
    T.train(arch, data, T.TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2}), out=tmp_path)
    with pytest.raises(ArchlabError, match="other settings"):
        T.train(arch, data, T.TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 2, "lr": 1e-3}), out=tmp_path)


def test_cosine_schedule_warms_up_then_decays_to_zero_at_the_last_step(arch, data, tmp_path):
    t = T.TrainConfig(steps=10, warmup=2, lr=1.0, lr_schedule="cosine")
    lrs = [t.lr_at(s) for s in range(10)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # warm-up, then the cosine starts at the peak
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and 0 < lrs[-1] < 0.05
    assert [T.TrainConfig(steps=10, warmup=2, lr=1.0).lr_at(s) for s in (0, 5, 9)] == [0.5, 1.0, 1.0]
    # with a decay, the step count changes what is learnt: a checkpoint of a shorter run is not extended
    cosine = {**TINY_TRAIN.__dict__, "lr_schedule": "cosine"}
    T.train(arch, data, T.TrainConfig(**{**cosine, "steps": 2}), out=tmp_path)
    with pytest.raises(ArchlabError, match="other settings"):
        T.train(arch, data, T.TrainConfig(**cosine), out=tmp_path)
    # and it trains differently from the constant rate
    assert T.train(arch, data, T.TrainConfig(**cosine)).val_loss != T.train(arch, data, TINY_TRAIN).val_loss


def test_nan_loss_ends_the_run_as_diverged(arch, data, monkeypatch):
    real = T.flow_loss
    calls = []

    def poisoned(*args):
        calls.append(1)
        loss = real(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(T, "flow_loss", poisoned)
    r = T.train(arch, data, TINY_TRAIN)
    assert r.status == "diverged" and "nan at step 2" in r.reason and r.steps == 2 and r.val_loss is None


def test_a_finite_blow_up_also_ends_the_run_as_diverged(arch, data, monkeypatch):
    real = T.flow_loss
    monkeypatch.setattr(T, "flow_loss", lambda *args: real(*args) * 1e4)
    r = T.train(arch, data, TINY_TRAIN)
    assert r.status == "diverged" and "at step 0" in r.reason and r.val_loss is None


def test_a_corrupt_checkpoint_is_one_line(arch, data, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"half a checkpoint")
    with pytest.raises(ArchlabError, match="cannot be read as a checkpoint"):
        T.train(arch, data, TINY_TRAIN, tmp_path)


def test_sampler_is_deterministic(arch, data):
    model = T.ProxyModel(T.proxy_arch(arch, 8, TINY_TRAIN), data.num_classes)
    labels = torch.tensor([0, 1, 2, 0])
    a = T.sample(model, labels, steps=3, cfg_scale=2.0, seed=5)
    b = T.sample(model, labels, steps=3, cfg_scale=2.0, seed=5)
    c = T.sample(model, labels, steps=3, cfg_scale=2.0, seed=6)
    assert a.dtype == torch.uint8 and a.shape == (4, 3, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- metrics ------------------------------------------------------------------------------------

def test_fid_of_real_vs_itself_is_zero_and_noise_is_far(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path))
    d = load_dataset(DataConfig(resolution=16, classes=5, per_class=40, val_per_class=40))
    ext = RandConv()
    real = real_features(ext, d.val, f"{d.key}-val")
    assert real.shape == (200, 256) and list(tmp_path.glob("features/*.pt"))
    same = fid_kid(real, features(ext, d.val))
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3
    noise = torch.randint(0, 256, d.val.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    far = fid_kid(real, features(ext, noise))
    train = fid_kid(real, features(ext, d.train))
    assert far["fid"] > 10 * train["fid"] > 0 and far["kid"] > 10 * abs(train["kid"])


def test_score_names_its_extractor(arch, data, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path))
    t = T.TrainConfig(**{**TINY_TRAIN.__dict__, "samples": 12, "sample_steps": 2, "fid_extractor": "randconv"})
    r = T.train(arch, data, t)
    assert r.fid_extractor == "randconv-v1" and r.fid > 0 and r.kid is not None


def test_train_cli_prints_scores_as_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path))
    cfg = tmp_path / "arch.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_dict(stages=[dict(channels=16), dict(channels=32, transformer_depth=1)],
                                            attention=dict(head_dim=8, qk_norm=False, rope=False))))
    argv = ["train", str(cfg), "--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "8",
            "--val-per-class", "4", "--steps", "2", "--batch", "4", "--width-mult", "1", "--samples", "6",
            "--sample-steps", "2", "--fid-extractor", "randconv", "--mu", "0.5", "--sigma", "0.8", "--json",
            "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("fid", "kid", "val_loss", "fid_extractor", "train", "dataset"):
        assert key in out
    assert out["status"] == "ok" and out["train"]["steps"] == 2 and out["dataset"]["classes"] == 3
    assert (out["train"]["mu"], out["train"]["sigma"]) == (0.5, 0.8)
    assert cli.main([*argv[:4], "--steps", "-1"]) == 2


def test_prepared_dataset_round_trips_and_subsets(tmp_path, capsys):
    path = tmp_path / "set.pt"
    argv = ["data", "--dataset", "synthetic", "--image-size", "8", "--classes", "3", "--per-class", "4",
            "--val-per-class", "2", "--export", str(path), "--json"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["train"] == 12
    full = load_dataset(DataConfig("synthetic", resolution=8, classes=3, per_class=4, val_per_class=2))
    again = load_dataset(DataConfig(str(path), resolution=8))
    assert torch.equal(again.train, full.train) and again.class_names == full.class_names and again.key == full.key
    sub = load_dataset(DataConfig(str(path), resolution=8, classes=2, per_class=1))
    assert sub.train_labels.tolist() == [0, 1] and len(sub.val) == 4 and sub.key != full.key
    with pytest.raises(ArchlabError, match="prepared at 8"):
        load_dataset(DataConfig(str(path), resolution=16))


class _Oracle(torch.nn.Module):
    """Knows the one image x0: its velocity along the straight path is (x_t - x0) / t."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0, self.num_classes = x0, 1
        self.arch = type("A", (), {"latent": type("L", (), {"resolution": x0.shape[-1]})()})()

    def forward(self, x, t, labels):
        return (x - self.x0) / t.view(-1, 1, 1, 1)


def test_sampler_and_loss_follow_the_rectified_flow_path():
    """An oracle velocity drives the Euler sampler from noise exactly to the data, and has zero loss."""
    x0 = torch.rand(1, 3, 8, 8) * 2 - 1
    oracle = _Oracle(x0)
    out = T.sample(oracle, torch.zeros(3, dtype=torch.long), steps=4, cfg_scale=2.0, seed=1)
    assert (out.int() - T.to_uint8(x0).int()).abs().max() <= 1
    g = torch.Generator().manual_seed(0)
    eps, t = torch.randn((3, 3, 8, 8), generator=g), torch.tensor([0.2, 0.5, 0.9])
    assert T.flow_loss(oracle, x0.expand(3, -1, -1, -1), torch.zeros(3, dtype=torch.long), t, eps) < 1e-10


def test_validation_images_cover_every_class():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    assert sorted(labels[T._spread(labels)[:3]].tolist()) == [0, 1, 2]
    assert sorted(labels[T._spread(labels)[:6]].tolist()) == [0, 0, 1, 1, 2, 2]


def test_folder_without_val_holds_out_a_share_and_refuses_a_class_with_nothing_left(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    root = _write_folder(tmp_path / "imgs", per_class=10)
    import shutil

    shutil.rmtree(root / "val")
    d = load_dataset(DataConfig(str(root / "train"), resolution=8))
    assert len(d.train) == 27 and len(d.val) == 3  # 1 of every 10 held out
    for p in list((root / "train" / "n01").iterdir())[1:]:
        p.unlink()
    with pytest.raises(ArchlabError, match="n01 has 1 image"):
        load_dataset(DataConfig(str(root / "train"), resolution=8))


def test_a_class_missing_from_val_is_validated_on_held_out_images_and_said(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("ARCHLAB_CACHE", str(tmp_path / "cache"))
    root = _write_folder(tmp_path / "imgs", per_class=10)
    shutil.rmtree(root / "val" / "n01")
    shutil.rmtree(root / "val" / "n02")
    d = load_dataset(DataConfig(str(root), resolution=8))
    assert sorted(np.bincount(d.val_labels.numpy()).tolist()) == [1, 1, 2]  # every class has validation images
    assert len(d.train) == 28 and "2 classes" in d.describe()["val_held_out_from_train"]


def test_bad_training_settings_fail_before_training(arch, data):
    for bad in ({"samples": 1}, {"grad_clip": 0.0}, {"fid_extractor": "vgg"}, {"device": "nonsense"}):
        with pytest.raises(ArchlabError, match=next(iter(bad))):
            T.train(arch, data, T.TrainConfig(**{**TINY_TRAIN.__dict__, **bad}))


def test_fid_weights_that_are_not_torchscript_are_one_line(tmp_path, monkeypatch):
    from archlab.metrics import extractor

    weights = tmp_path / "pt_inception-2015-12-05.pth"
    torch.save({"conv.weight": torch.zeros(1)}, weights)  # a state dict, as torch-fidelity ships
    monkeypatch.setenv("ARCHLAB_FID_WEIGHTS", str(weights))
    with pytest.raises(ArchlabError, match="not a TorchScript model"):
        extractor("inception")


def test_fid_weights_given_by_path_are_named_by_their_hash(tmp_path, monkeypatch):
    from archlab.metrics import extractor

    scripted = torch.jit.script(torch.nn.Flatten())
    names = []
    for i in range(2):
        path = tmp_path / f"w{i}" / "default_1.pt"
        path.parent.mkdir()
        scripted.save(str(path))
        path.write_bytes(path.read_bytes() + b"\0" * i)  # same file name, other bytes
        monkeypatch.setenv("ARCHLAB_FID_WEIGHTS", str(path))
        names.append(extractor("inception").name)
    assert names[0] != names[1] and all("sha256" in n for n in names)
