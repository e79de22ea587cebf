"""Tests for perceptual.py: layouts against the manifests, golden vectors, strict loading, gradients, GAN."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import perceptual as P

REFERENCE = Path(__file__).resolve().parent.parent / "shared" / "reference"
GOLDEN = REFERENCE / "golden"


def manifest(name):
    """{tensor name: shape} from a manifest: lines 'name\\t[shape]\\tdtype', last line a '#' summary."""
    path = REFERENCE / "manifests" / name
    if not path.is_file():
        pytest.skip(f"{path} absent (the shared reference folder is not checked out next to this repo)")
    lines = path.read_text().strip().splitlines()
    assert lines[-1].startswith("#")
    rows = [line.split("\t") for line in lines[:-1]]
    return {n: tuple(int(d) for d in s.strip("[]").split(",") if d.strip()) for n, s, _ in rows}


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def recipe():
    """The golden recipe module (deterministic weights and inputs), or skip."""
    if not (GOLDEN / "recipe.py").is_file():
        pytest.skip(f"{GOLDEN} absent: golden vectors need ../shared/reference/golden")
    sys.path.insert(0, str(GOLDEN))
    import recipe as r
    return r


def golden_filled(cls, rename=lambda k: k, zero=()):
    """cls() built without random init, every tensor set to recipe.tensor_for(rename(name)) (as recipe.fill_
    does), except names starting with `zero`, set to zeros (unused by the forward; saves time)."""
    r = recipe()
    with torch.device("meta"):
        m = cls()
    state = {k: torch.zeros(v.shape) if k.startswith(zero) else r.tensor_for(rename(k), tuple(v.shape))
             for k, v in m.state_dict().items()}
    m.load_state_dict(state, strict=True, assign=True)
    return m.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def convnext():
    return golden_filled(P.ConvNeXtSmall)


@pytest.fixture(scope="module")
def lpips_net():
    # Golden filled the VGG by its torchvision names and the heads by the lpips names: strip "net.".
    return golden_filled(P.LPIPS, lambda k: k.removeprefix("net."), zero=("net.classifier.",))


@pytest.fixture(scope="module")
def golden():
    r = recipe()
    return r.inputs()["images"], np.load(GOLDEN / "perceptual.npz")


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# --- layouts ---------------------------------------------------------------------------------------

def test_layouts_match_manifests():
    with torch.device("meta"):
        convnext, net = P.ConvNeXtSmall(), P.LPIPS()
    assert shapes(convnext) == manifest("torchvision_convnext_small.txt")
    assert shapes(net.net) == manifest("torchvision_vgg16.txt")
    lin = {k: v for k, v in shapes(net).items() if not k.startswith("net.")}
    assert lin == manifest("lpips_v0.1_vgg.txt")


# --- golden vectors ---------------------------------------------------------------------------------

def test_convnext_golden(convnext, golden):
    images, g = golden
    with torch.no_grad():
        logits = convnext(P.convnext_input(images))
        mse = P.perceptual_loss(convnext, images[:1], images[1:])
    assert rel_err(logits, g["convnext_logits"]) < 1e-4
    # golden perceptual_mse is the mean over the 1000 logits of the squared difference
    assert rel_err(mse, g["perceptual_mse"]) < 1e-5


def test_lpips_golden(lpips_net, golden):
    images, g = golden
    with torch.no_grad():
        d = P.lpips(lpips_net, images[:1], images[1:])  # at 256 px: golden did not resize
    assert rel_err(d, g["lpips_vgg"]) < 1e-5


# --- gradients --------------------------------------------------------------------------------------

def test_gradients_reach_inputs_not_nets(convnext, lpips_net):
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    (P.perceptual_loss(convnext, x, y) + P.lpips(lpips_net, x, y)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for net in (convnext, lpips_net):
        assert not net.training
        assert all(not p.requires_grad and p.grad is None for p in net.parameters())


def test_lpips_is_zero_for_identical_images(lpips_net):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert P.lpips(lpips_net, x, x).item() == 0.0


# --- loading ----------------------------------------------------------------------------------------

def test_load_strict_roundtrip(tmp_path, convnext, lpips_net):
    torch.save(convnext.state_dict(), tmp_path / "convnext.pth")
    state = lpips_net.state_dict()
    torch.save({k[4:]: v for k, v in state.items() if k.startswith("net.")}, tmp_path / "vgg16.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("net.")}, tmp_path / "vgg.pth")
    c = P.load_convnext(tmp_path / "convnext.pth")
    n = P.load_lpips(tmp_path / "vgg16.pth", tmp_path / "vgg.pth")
    for loaded, ref in ((c, convnext), (n, lpips_net)):
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        ref_state = ref.state_dict()
        assert all(torch.equal(v, ref_state[k]) for k, v in loaded.state_dict().items())


def test_load_refuses_wrong_keys(tmp_path, lpips_net):
    lin = {k: v for k, v in lpips_net.state_dict().items() if not k.startswith("net.")}
    lin["lin5.model.1.weight"] = lin.pop("lin4.model.1.weight")
    torch.save(lin, tmp_path / "bad_lin.pth")
    with pytest.raises(RuntimeError, match=r"bad_lin\.pth.*lin4\.model\.1\.weight.*lin5\.model\.1\.weight"):
        P.load_lpips(tmp_path / "unused.pth", tmp_path / "bad_lin.pth")
    # A VGG file without its classifier (features only) is refused: the full torchvision file is expected.
    good_lin = {k: v for k, v in lpips_net.state_dict().items() if k.startswith("lin")}
    torch.save(good_lin, tmp_path / "vgg.pth")
    features = {k[4:]: v for k, v in lpips_net.state_dict().items() if k.startswith("net.features.")}
    torch.save(features, tmp_path / "features.pth")
    with pytest.raises(RuntimeError, match=r"features\.pth.*classifier\.0\.bias"):
        P.load_lpips(tmp_path / "features.pth", tmp_path / "vgg.pth")
    torch.save({"stem.0.weight": torch.zeros(96, 3, 4, 4)}, tmp_path / "timm.pth")
    with pytest.raises(RuntimeError, match=r"timm\.pth.*344 missing.*features\.0\.0\.bias.*stem\.0\.weight"):
        P.load_convnext(tmp_path / "timm.pth")
    lin["lin4.model.1.weight"] = torch.zeros(1, 256, 1, 1)
    del lin["lin5.model.1.weight"]
    torch.save(lin, tmp_path / "bad_lin.pth")
    with pytest.raises(RuntimeError, match=r"bad_lin\.pth.*lin4\.model\.1\.weight \[1, 256, 1, 1\] != "):
        P.load_lpips(tmp_path / "unused.pth", tmp_path / "bad_lin.pth")


def test_load_missing_file_says_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*convnext_small-0c510722\.pth.*switched off"):
        P.load_convnext(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"nolin\.pth.*PerceptualSimilarity.*switched off"):
        P.load_lpips(tmp_path / "novgg.pth", tmp_path / "nolin.pth")
    lin = {f"lin{k}.model.1.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate(P.VGG16_TAP_CHANNELS)}
    torch.save(lin, tmp_path / "vgg.pth")
    with pytest.raises(FileNotFoundError, match=r"novgg\.pth.*vgg16-397923af\.pth.*switched off"):
        P.load_lpips(tmp_path / "novgg.pth", tmp_path / "vgg.pth")


# --- discriminator and hinge losses -----------------------------------------------------------------

@pytest.mark.parametrize("size", [32, 256])
def test_discriminator_patch_logits(size):
    torch.manual_seed(0)
    d = P.Discriminator(base_channels=8, channel_mult=(1, 2, 4))
    x = torch.rand(2, 3, size, size, requires_grad=True)
    logits = d(x)
    assert logits.shape == (2, 1, size // 8, size // 8)
    logits.mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_discriminator_default_widths():
    with torch.device("meta"):
        d = P.Discriminator()
    assert [c.out_channels for c in [d.stem, *d.convs]] == [128, 128, 256, 512]
    assert d.to_logits.out_channels == 1


def test_blur_downsample_keeps_constants_inside():
    x = torch.full((1, 2, 8, 8), 3.0)
    y = P.blur_downsample(x)
    assert y.shape == (1, 2, 4, 4)
    torch.testing.assert_close(y[..., 1:-1, 1:-1], torch.full((1, 2, 2, 2), 3.0))


def test_hinge_losses_textbook_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = 0, 0.5, 2    -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = 0, 1, 2      -> mean 1
    torch.testing.assert_close(P.hinge_d_loss(real, fake), torch.tensor(0.5 * (5 / 6 + 1)))
    torch.testing.assert_close(P.hinge_d_loss(torch.ones(4), -torch.ones(4)), torch.tensor(0.0))
    torch.testing.assert_close(P.generator_adv_loss(fake), torch.tensor(1 / 3))
