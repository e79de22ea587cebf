"""Tests for data.py: ADM crop, shapes, folders, npz, ten-crop, pre-tokenization (1 and 2 processes), codes."""
import os
import socket
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data as D


class PatchColourTokenizer(torch.nn.Module):
    """Stand-in tokenizer: one code per patch = its mean colour quantised to 8 levels per channel."""

    def __init__(self, image_size=16, patch=8):
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, codebook_size=512)
        self.patch = patch

    def encode(self, x):
        # Integer pixel sums (exact in float32 for any summation order), so mirrored patches get equal codes.
        sums = (F.avg_pool2d((x * 255).round(), self.patch) * self.patch ** 2).long()  # [B, 3, h, w]
        q = sums * 8 // (255 * self.patch ** 2 + 1)  # 0..7
        return (q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]).flatten(1)  # [B, h * w] raster order


def write_npz(path, n=5, side=18, seed=0, **extra):
    """Random uint8 [n, side, side, 3] images with labels 0, 1, 2, 0, ... as x_train/y_train (+ extra keys)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    y = np.arange(n, dtype=np.int64) % 3
    np.savez(path, x_train=x, y_train=y, **extra)
    return x, y


def corner_image(side=44, block=4):
    """uint8 [side, side, 3] grey with distinct colour blocks in the four corners."""
    a = np.full((side, side, 3), 128, np.uint8)
    a[:block, :block] = (255, 0, 0)      # top-left red
    a[:block, -block:] = (0, 255, 0)     # top-right green
    a[-block:, :block] = (0, 0, 255)     # bottom-left blue
    a[-block:, -block:] = (255, 255, 0)  # bottom-right yellow
    return a


# ---------------------------------------------------------------- ADM centre crop

def test_center_crop_adm_size_and_centre():
    # 60 x 30 (W x H): the centre 30 x 30 is red, the side strips blue; at target 30 only the crop acts.
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, :, 2] = 255
    a[:, 15:45] = (255, 0, 0)
    out = D.center_crop_adm(Image.fromarray(a), 30)
    assert out.size == (30, 30)
    assert (np.asarray(out) == (255, 0, 0)).all()
    # Shrinking (no halving: 40 < 2 * 20): the centre still red away from the edges.
    out = np.asarray(D.center_crop_adm(Image.fromarray(a).resize((80, 40)), 20)).astype(int)
    assert out.shape == (20, 20, 3)
    assert (out[2:-2, 2:-2, 0] > 240).all() and (out[2:-2, 2:-2, 2] < 15).all()


def test_center_crop_adm_box_halving(monkeypatch):
    calls = []
    resize = Image.Image.resize

    def spy(self, size, resample=None, *args, **kwargs):
        calls.append((self.size, tuple(size), resample))
        return resize(self, size, resample, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = D.center_crop_adm(Image.new("RGB", (300, 200)), 32)  # 200 -> 100 -> 50, then bicubic to 32
    assert out.size == (32, 32)
    assert [c[2] for c in calls] == [Image.BOX, Image.BOX, Image.BICUBIC]
    assert calls[0][1] == (150, 100) and calls[1][1] == (75, 50)
    assert calls[2][1] == (round(75 * 32 / 50), 32)  # each side rounded
    calls.clear()
    D.center_crop_adm(Image.new("RGB", (128, 64)), 32)  # shorter side exactly 2 * size: halves once
    assert [(c[1], c[2]) for c in calls] == [((64, 32), Image.BOX), ((64, 32), Image.BICUBIC)]


# ---------------------------------------------------------------- procedural shapes

def test_shapes_deterministic_shapes_and_range():
    for size in (32, 64):
        ds = D.build_dataset("shapes", size, train=False, n_images=50)
        x, y = ds[13]
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and y == 13 % 10
        assert torch.equal(x, D.build_dataset("shapes", size, train=False, n_images=50)[13][0])
    assert ds.num_classes == 10 and ds.class_names == list(D.SHAPES_CLASSES)
    assert not torch.equal(ds[13][0], D.build_dataset("shapes", 64, train=False, seed=1)[13][0])
    assert not torch.equal(ds[13][0], D.build_dataset("shapes", 64, train=False, split="test")[13][0])
    x, _ = D.build_dataset("shapes", 32, flip=True)[3]  # flip gives one of the two mirror images
    ref = D.build_dataset("shapes", 32, flip=False)[3][0]
    assert torch.equal(x, ref) or torch.equal(x, ref.flip(-1))
    with pytest.raises(IndexError):
        ds[50]


def test_shapes_classes_separable():
    train = D.build_dataset("shapes", 32, train=False, n_images=400)
    test = D.build_dataset("shapes", 32, train=False, n_images=200, split="test")
    xs = torch.stack([train[i][0] for i in range(len(train))]).flatten(1)
    ys = torch.tensor([train[i][1] for i in range(len(train))])
    means = torch.stack([xs[ys == c].mean(0) for c in range(10)])
    xt = torch.stack([test[i][0] for i in range(len(test))]).flatten(1)
    yt = torch.tensor([test[i][1] for i in range(len(test))])
    accuracy = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert accuracy > 0.8, accuracy


# ---------------------------------------------------------------- image folders

def make_folder(root, n_per_class, n_corrupt, size=12):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["b_dog", "a_cat"]):  # sorted order: a_cat = 0, b_dog = 1
        os.makedirs(root / name)
        for i in range(n_per_class):
            colour = (200, 30, 30) if name == "a_cat" else (30, 30, 200)
            ext = ".PNG" if i % 2 else ".png"  # extensions match case-insensitively
            Image.new("RGB", (size + i % 3, size), colour).save(root / name / f"{i:03d}{ext}", format="PNG")
    for i in range(n_corrupt):
        (root / "a_cat" / f"zz_bad{i}.jpg").write_bytes(rng.integers(0, 256, 200, dtype=np.uint8).tobytes())
    (root / "a_cat" / "notes.txt").write_text("not an image")


def test_folder_dataset_labels_and_corrupt_file(tmp_path):
    make_folder(tmp_path, 60, 1)  # 1 bad of 121 files is under 1 %
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*zz_bad0\.jpg"):
        ds = D.build_dataset(str(tmp_path), 8, train=True)
    assert ds.flip and len(ds) == 120 and ds.class_names == ["a_cat", "b_dog"] and ds.num_classes == 2
    assert list(ds.skipped) == [str(tmp_path / "a_cat" / "zz_bad0.jpg")]
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 0 and x[0].mean() > x[2].mean()
    x, y = ds[len(ds) - 1]
    assert y == 1 and x[2].mean() > x[0].mean()
    assert sorted(set(ds.samples[i][1] for i in range(len(ds)))) == [0, 1]


def test_folder_dataset_too_many_corrupt_raises(tmp_path):
    make_folder(tmp_path, 5, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="3 of 13 image files are unreadable"):
            D.build_dataset(str(tmp_path), 8)
        assert len(D.build_dataset(str(tmp_path), 8, max_bad_fraction=0.5)) == 10


def test_folder_dataset_survives_file_failing_at_load(tmp_path):
    make_folder(tmp_path, 60, 0)
    ds = D.build_dataset(str(tmp_path), 8, train=False)
    path = ds.samples[3][0]
    with open(path, "rb") as f:
        payload = f.read()
    with open(path, "wb") as f:  # header still valid, pixel data cut: fails only when decoded
        f.write(payload[:len(payload) // 2])
    with pytest.warns(UserWarning, match="using the next image"):
        x, y = ds[3]
    assert torch.equal(x, ds[4][0]) and list(ds.failed) == [path]


def test_missing_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected 'shapes'"):
        D.build_dataset(str(tmp_path / "nope"), 32)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a .npz"):
        D.build_dataset(str(tmp_path / "file.txt"), 32)
    with pytest.raises(ValueError, match="no class sub-folders"):
        D.build_dataset(str(tmp_path), 32)


# ---------------------------------------------------------------- npz arrays

def test_npz_both_key_styles(tmp_path):
    x, y = write_npz(tmp_path / "cifar.npz", n=6, side=16, x_test=np.zeros((2, 16, 16, 3), np.uint8),
                     y_test=np.array([1, 2]), classes=np.array(["a", "b", "c"]))
    ds = D.build_dataset(str(tmp_path / "cifar.npz"), 16, train=False)
    assert len(ds) == 6 and ds.class_names == ["a", "b", "c"]
    image, label = ds[4]
    assert torch.equal(image, torch.from_numpy(x[4]).permute(2, 0, 1).float() / 255) and label == y[4]
    test = D.build_dataset(str(tmp_path / "cifar.npz"), 16, split="test")
    assert len(test) == 2 and test[1][1] == 2 and test.flip
    np.savez(tmp_path / "adm.npz", arr_0=x, arr_1=y, classes=np.array([1, "a"], dtype=object))
    adm = D.build_dataset(str(tmp_path / "adm.npz"), 8, train=False, n_images=3)
    assert len(adm) == 3 and adm[0][0].shape == (3, 8, 8) and adm.num_classes == 3  # object names ignored
    assert [adm[i][1] for i in range(3)] == [int(y[0]), int(y[2]), int(y[4])]  # evenly spaced subset


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((2, 8, 8, 3), np.float32), y_train=np.zeros(2, np.int64)), "dtype float32"),
    (dict(x_train=np.zeros((2, 3, 8, 8), np.uint8), y_train=np.zeros(2, np.int64)), "NCHW"),
    (dict(x_train=np.zeros((2, 8, 8, 4), np.uint8), y_train=np.zeros(2, np.int64)), "4 channels"),
    (dict(x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.zeros(2, np.int64)), r"shape \(2, 8, 8\)"),
    (dict(x_train=np.zeros((2, 8, 8, 3), np.uint8)), "no labels 'y_train'"),
    (dict(arr_0=np.zeros((2, 8, 8, 3), np.uint8)), "no labels 'arr_1'"),
    (dict(x_train=np.zeros((2, 8, 8, 3), np.uint8), y_train=np.zeros(3, np.int64)), "2 images .* 3 labels"),
    (dict(images=np.zeros((2, 8, 8, 3), np.uint8)), "expected x_train and y_train"),
])
def test_npz_bad_layouts(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        D.build_dataset(str(tmp_path / "bad.npz"), 8)


# ---------------------------------------------------------------- ten-crop

def test_ten_crop_order():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # TL, TR, BL, BR
    crops = D.ten_crop(Image.fromarray(corner_image(44)), 40)  # int(40 * 1.1) = 44: no resampling
    assert crops.shape == (10, 3, 40, 40) and crops.dtype == torch.float32
    assert len(D.TEN_CROP_ORDER) == 10 and D.TEN_CROP_ORDER[4] == "centre"
    big = torch.from_numpy(corner_image(44)).permute(2, 0, 1).float() / 255
    for k, (top, left) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]):
        assert torch.equal(crops[k], big[:, top:top + 40, left:left + 40])
        assert torch.equal(crops[k + 5], crops[k].flip(-1))
    for k, colour in enumerate(colours):  # each corner crop holds its own corner's colour and no other
        pixels = set(map(tuple, (crops[k] * 255).round().int().flatten(1).T.tolist()))
        assert colour in pixels and not pixels & (set(colours) - {colour})
    assert torch.equal(crops, D.ten_crop_tensor(big[None], 40)[0])


# ---------------------------------------------------------------- pre-tokenization and codes

def test_pretokenize_layout_and_order(tmp_path):
    x, y = write_npz(tmp_path / "src.npz", n=5, side=18)
    tok = PatchColourTokenizer(16, 8)
    out = D.pretokenize(tok, str(tmp_path / "src.npz"), str(tmp_path / "codes.npz"), batch_size=2, progress=False)
    with np.load(out) as f:
        assert f["codes"].dtype == np.int16 and f["codes"].shape == (5, 10, 4)
        assert f["labels"].dtype == np.int64 and f["labels"].tolist() == y.tolist()
        assert (int(f["n_tokens"]), int(f["codebook_size"]), int(f["image_size"]), int(f["num_classes"])) == \
            (4, 512, 16, 3)
        codes = f["codes"]
    for i in range(5):  # same codes as encoding ten_crop() of the image, crop by crop
        assert codes[i].tolist() == tok.encode(D.ten_crop(Image.fromarray(x[i]), 16)).tolist()
    grid = codes.reshape(5, 10, 2, 2)  # the flipped crops' 2 x 2 code grids are mirrored
    assert (grid[:, 5:] == grid[:, :5, :, ::-1]).all()
    assert not os.path.exists(str(tmp_path / "codes.npz") + ".tmp" + str(os.getpid()))


def test_pretokenize_shapes_and_codes_dataset(tmp_path):
    tok = PatchColourTokenizer(16, 4)
    source = D.build_dataset("shapes", 17, train=False, n_images=4)
    path = D.pretokenize(tok, source, str(tmp_path / "c.npz"), progress=False)
    ds = D.CodesDataset(path, seed=3)
    assert len(ds) == 4 and ds.n_tokens == 16 and ds.num_classes == 10 and ds.class_names[2] == "triangle"
    with np.load(path) as f:
        options = [tuple(c) for c in f["codes"][2].tolist()]
    seen = set()
    for _ in range(100):
        codes, label = ds[2]
        assert codes.dtype == torch.int64 and codes.shape == (16,) and label == 2
        assert tuple(codes.tolist()) in options
        seen.add(tuple(codes.tolist()))
    assert len(seen) >= min(5, len(set(options)))
    a, b = D.CodesDataset(path, seed=5), D.CodesDataset(path, seed=5)  # same seed, same draws
    assert [a[0][0].tolist() for _ in range(20)] == [b[0][0].tolist() for _ in range(20)]
    with pytest.raises(ValueError, match="flip"):
        D.pretokenize(tok, D.build_dataset("shapes", 17, train=True, n_images=4), str(tmp_path / "d.npz"))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("n_tokens"), "missing"),
    (lambda f: f.update(codes=f["codes"].astype(np.int32)), "int16"),
    (lambda f: f.update(codes=f["codes"][:, :9]), "expected .N, 10"),
    (lambda f: f.update(labels=f["labels"][:2]), "one per image"),
    (lambda f: f.update(codes=f["codes"] + 600), "outside"),
])
def test_codes_dataset_validates(tmp_path, change, message):
    good = dict(codes=np.zeros((3, 10, 4), np.int16), labels=np.zeros(3, np.int64), n_tokens=4,
                codebook_size=512, image_size=16, num_classes=2)
    change(good)
    np.savez(tmp_path / "bad.npz", **good)
    with pytest.raises(ValueError, match=message):
        D.CodesDataset(str(tmp_path / "bad.npz"))


def _pretokenize_worker(rank, world, port, source, out_path):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world)
    try:
        D.pretokenize(PatchColourTokenizer(16, 8), source, out_path, batch_size=2, progress=False)
    finally:
        torch.distributed.destroy_process_group()


def test_pretokenize_two_processes_matches_one(tmp_path):
    write_npz(tmp_path / "src.npz", n=5, side=20)  # 5 images: rank 0 gets 3, rank 1 gets 2
    source = str(tmp_path / "src.npz")
    single = D.pretokenize(PatchColourTokenizer(16, 8), source, str(tmp_path / "one.npz"), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (2, port, source, str(tmp_path / "two.npz"))
    torch.multiprocessing.spawn(_pretokenize_worker, args=args, nprocs=2)
    with np.load(single) as one, np.load(tmp_path / "two.npz") as two:
        assert sorted(one.files) == sorted(two.files)
        for key in one.files:
            assert one[key].dtype == two[key].dtype and np.array_equal(one[key], two[key]), key
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "src.npz", "two.npz"]  # part files removed


# ---------------------------------------------------------------- grid

def test_save_grid(tmp_path):
    images = torch.rand(5, 3, 6, 7)
    D.save_grid(images, str(tmp_path / "sub" / "grid.png"), nrow=3)
    grid = np.asarray(Image.open(tmp_path / "sub" / "grid.png"))
    assert grid.shape == (2 * 8 + 2, 3 * 9 + 2, 3)
    assert np.array_equal(grid[2:8, 11:18], (images[1] * 255).round().byte().permute(1, 2, 0).numpy())
    assert (grid[:2] == 0).all() and (grid[:, :2] == 0).all()
