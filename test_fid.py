"""Tests of fid.py: metric maths against closed forms, the Inception against the golden vectors, file handling, CLI."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fid

SHARED = Path(__file__).parent.parent / "shared"
GOLDEN = SHARED / "reference" / "golden"
INCEPTION_MANIFEST = SHARED / "reference" / "manifests" / "pt_inception_2015_12_05.txt"
needs_fid_golden = pytest.mark.skipif(not (GOLDEN / "inception.npz").is_file() or not INCEPTION_MANIFEST.is_file(),
                                      reason=f"{SHARED} is absent: no golden vectors or manifest to compare with")


def _fid_recipe():
    """The shared `recipe` module (deterministic weights and inputs of the golden vectors)."""
    sys.path.insert(0, str(GOLDEN))
    try:
        import recipe
    finally:
        sys.path.remove(str(GOLDEN))
    return recipe


@pytest.fixture(scope="module")
def fid_inception():
    """An FID Inception with the golden weights when ../shared exists, else a fixed random init."""
    torch.manual_seed(0)
    model = fid.FIDInception().eval()
    return _fid_recipe().fill_(model) if GOLDEN.is_dir() else model


@pytest.fixture(scope="module")
def fid_weights(fid_inception, tmp_path_factory):
    """The inception's weights saved like pytorch-fid's release file (no num_batches_tracked)."""
    path = tmp_path_factory.mktemp("weights") / fid.WEIGHTS_NAME
    torch.save({k: v for k, v in fid_inception.state_dict().items() if "num_batches_tracked" not in k}, path)
    return path


def _fid_images(n, h=16, w=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _fid_rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# --- metric maths ------------------------------------------------------------------------------------


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 2, d), rng.uniform(0.1, 2, d)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # commuting but not diagonal: both covariances share a random eigenbasis q
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # general SPD pair: tr sqrt(S1 S2) is the sum of square roots of the (real, positive) eigenvalues of S1 S2
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = x @ x.T + 0.1 * np.eye(d), y @ y.T + 0.1 * np.eye(d)
    tr_sqrt = np.sqrt(np.linalg.eigvals(s1 @ s2).real).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_distance_of_a_set_with_itself_is_zero_even_when_singular():
    feats = np.random.default_rng(1).normal(size=(10, 20))  # 10 samples in 20-D: singular covariance
    with pytest.warns(UserWarning, match="singular"):
        mu, sigma = fid.statistics(feats)
    assert sigma.dtype == np.float64 and np.allclose(sigma, np.cov(feats, rowvar=False))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    with pytest.raises(ValueError, match="semi-definite"):
        fid.frechet_distance(mu, sigma, mu, -np.eye(20))


def test_inception_score_limits_and_split_order():
    assert fid.inception_score(np.zeros((10, 1008))) == pytest.approx(1.0, abs=1e-12)  # uniform predictions
    n_classes, per_class = 4, 5
    labels = np.tile(np.arange(n_classes), per_class)  # interleaved: every split sees every class
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels] = 60.0  # confident
    assert fid.inception_score(logits) == pytest.approx(n_classes, rel=1e-9)
    # class-sorted files with splits of one class each: IS collapses to 1 (why samples must not be sorted)
    sorted_logits = logits[np.argsort(labels, kind="stable")]
    assert fid.inception_score(sorted_logits, split_size=per_class) == pytest.approx(1.0, rel=1e-9)


def _fid_naive_pr(ref, smp, k):
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((smp[:, None] - smp[None]) ** 2).sum(-1)
    d_sr = ((smp[:, None] - ref[None]) ** 2).sum(-1)
    r_ref, r_smp = np.sort(d_rr, 1)[:, k], np.sort(d_ss, 1)[:, k]
    return (d_sr <= r_ref[None]).any(1).mean(), (d_sr.T <= r_smp[None]).any(1).mean()


def test_precision_recall():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    assert fid.precision_recall(x, x, device="cpu") == (1.0, 1.0)
    assert fid.precision_recall(x, x + 1000, device="cpu") == (0.0, 0.0)
    ref, smp = rng.normal(size=(23, 8)), rng.normal(0.5, 1.2, size=(17, 8))
    got = fid.precision_recall(ref, smp, k=3, block=7, device="cpu")  # small blocks exercise the blocking
    assert got == pytest.approx(_fid_naive_pr(ref, smp, 3), abs=1e-12)


# --- network and preprocessing -----------------------------------------------------------------------


def test_tf1_resize_by_hand():
    x = torch.tensor([[0.0, 3.0], [6.0, 9.0]])[None, None]
    # src = dst * 2/3: 0, 0.667, 1.333 -> (lower, upper, weight) = (0, 0, 0), (0, 1, 2/3), (1, 1, 1/3)
    expected = torch.tensor([[0.0, 2.0, 3.0], [4.0, 6.0, 7.0], [6.0, 8.0, 9.0]])
    torch.testing.assert_close(fid.resize_tf1_bilinear(x, 3)[0, 0], expected)
    # 4 -> 6: src = 0, .667, 1.333, 2, 2.667, 3.333; the last upper neighbour is clamped to index 3
    row = torch.tensor([0.0, 10.0, 20.0, 40.0])
    out = fid.resize_tf1_bilinear(row.expand(1, 1, 4, 4), 6)[0, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 20 / 3, 40 / 3, 20.0, 100 / 3, 40.0]).expand(6, 6))
    img = torch.from_numpy(_fid_images(1, 299, 299))
    torch.testing.assert_close(fid.preprocess(img, "adm"), (img.permute(0, 3, 1, 2).float() - 128) / 128)
    with pytest.raises(ValueError, match="mode"):
        fid.preprocess(img, "bicubic")


def test_sfid_flattening_order(fid_inception):
    n, h, w, c = torch.meshgrid(*(torch.arange(s) for s in (2, 17, 17, 768)), indexing="ij")
    x = (n * 10**6 + c * 1000 + h * 17 + w).permute(0, 3, 1, 2).float()  # N, 768, 17, 17
    f = fid.spatial_features(x)
    assert f.shape == (2, 2023)
    for hh, ww, cc in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (3, 5, 2), (16, 16, 6)]:
        assert f[1, (hh * 17 + ww) * 7 + cc] == x[1, cc, hh, ww]
    # the first 192 channels of Mixed_6d's output are branch1x1's ReLU output
    y = torch.randn(1, 768, 17, 17)
    with torch.no_grad():
        torch.testing.assert_close(fid_inception.Mixed_6d(y)[:, :192], fid_inception.Mixed_6d.branch1x1(y))


@needs_fid_golden
def test_state_dict_matches_manifest():
    lines = INCEPTION_MANIFEST.read_text().splitlines()
    rows = [line.split("\t") for line in lines if line and not line.startswith("#")]
    manifest = {name: (json.loads(shape), dtype) for name, shape, dtype in rows}
    state = fid.FIDInception().state_dict()
    assert list(state) == list(manifest)
    for name, t in state.items():
        assert (list(t.shape), str(t.dtype).removeprefix("torch.")) == manifest[name], name


@needs_fid_golden
@pytest.mark.parametrize("mode", fid.MODES)
def test_inception_reproduces_golden_features(fid_inception, mode):
    images = _fid_recipe().inputs()["uint8_images"].numpy()
    golden = np.load(GOLDEN / "inception.npz")
    feats = fid.extract(fid_inception, images, mode, progress=False)
    for key in ("pool3", "logits", "spatial"):
        assert _fid_rel_err(feats[key], golden[f"{mode.replace('-', '_')}_{key}"]) < 1e-4, key
    one_by_one = fid.extract(fid_inception, images, mode, batch_size=1, progress=False)
    for key in feats:
        assert _fid_rel_err(one_by_one[key], feats[key]) < 1e-5, key


# --- weights and inputs ------------------------------------------------------------------------------


def test_load_inception_strictness(fid_inception, fid_weights, tmp_path):
    state = fid_inception.state_dict()
    model = fid.load_inception(fid_weights)  # without num_batches_tracked, like the release file
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])
    assert not model.training
    with_counters = tmp_path / "with_counters.pth"
    torch.save(state, with_counters)
    torch.testing.assert_close(fid.load_inception(with_counters).Mixed_7c.branch_pool.bn.running_var,
                               state["Mixed_7c.branch_pool.bn.running_var"])
    missing = {k: v for k, v in state.items() if k != "Mixed_6d.branch1x1.bn.running_var"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="Mixed_6d.branch1x1.bn.running_var"):
        fid.load_inception(tmp_path / "missing.pth")
    torch.save({**state, "AuxLogits.fc.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match="AuxLogits.fc.weight"):
        fid.load_inception(tmp_path / "extra.pth")
    with pytest.raises(FileNotFoundError) as err:
        fid.load_inception(tmp_path / "nowhere.pth")
    for words in (fid.WEIGHTS_NAME, "pytorch-fid", "torch-fidelity", "sampling"):
        assert words in str(err.value)


@pytest.mark.parametrize("array, words", [
    (np.zeros((2, 8, 8, 3), np.float32), "float32"),
    (np.zeros((2, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((2, 8, 8, 4), np.uint8), "4 channels"),
    (np.zeros((2, 8, 8, 1), np.uint8), "1 channels"),
    (np.zeros((2, 8, 8), np.uint8), "shape"),
])
def test_malformed_images_are_refused(tmp_path, array, words):
    np.savez(tmp_path / "bad.npz", arr_0=array)
    with pytest.raises(ValueError, match=words):
        fid.load_source(tmp_path / "bad.npz")


def test_malformed_npz_keys_are_refused(tmp_path):
    np.savez(tmp_path / "keys.npz", images=_fid_images(2))
    with pytest.raises(ValueError, match="arr_0"):
        fid.load_source(tmp_path / "keys.npz")
    np.savez(tmp_path / "half.npz", mu=np.zeros(2048))
    with pytest.raises(ValueError, match="sigma"):
        fid.load_source(tmp_path / "half.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(10), sigma=np.eye(10))
    with pytest.raises(ValueError, match="2048"):
        fid.load_source(tmp_path / "shape.npz")


def test_lazy_npz_reader_matches_np_load(tmp_path):
    images = _fid_images(7, 5, 4)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "x.npz", arr_0=images, arr_1=np.arange(7))
        reader = fid.NpzImages(tmp_path / "x.npz")
        assert len(reader) == 7
        for s in (slice(0, 3), slice(3, 6), slice(6, 9), slice(1, 2), slice(0, 7)):  # in order, then back
            np.testing.assert_array_equal(reader[s], images[s])


def test_folder_with_a_corrupt_image_is_scored_with_the_skip_reported(fid_inception, tmp_path):
    (tmp_path / "sub").mkdir()  # recursive search
    for i, image in enumerate(_fid_images(4, 20, 24)):
        Image.fromarray(image).save(tmp_path / ("sub" if i % 2 else "") / f"{i}.png")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"not an image at all")
    src = fid.load_source(tmp_path)
    with pytest.warns(UserWarning, match="broken.jpg"):
        done = fid.complete(src, fid_inception, need_logits=True)
    assert done["n"] == 4 and done["skipped"] == 1
    assert done["pool3"].shape == (4, 2048) and done["mu_s"].shape == (2023,)


# --- command line ------------------------------------------------------------------------------------


def test_cli_end_to_end_and_cached_statistics(fid_weights, tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", arr_0=_fid_images(6, seed=1))
    np.savez(tmp_path / "samples.npz", arr_0=_fid_images(6, seed=2), arr_1=np.arange(6))
    common = ["--inception", str(fid_weights), "--device", "cpu"]
    # score, write JSON, and cache REF's statistics in the same run
    out = fid.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), *common,
                    "--json", str(tmp_path / "out.json"), "--save-stats", str(tmp_path / "stats.npz")])
    printed = capsys.readouterr().out
    assert printed.index("Inception Score") < printed.index("FID") < printed.index("sFID") \
        < printed.index("Precision") < printed.index("Recall")
    metrics = json.loads((tmp_path / "out.json").read_text())
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert np.isfinite(metrics[key]), key
    assert metrics["num_samples"] == 6 and metrics["mode"] == "adm"
    cached = np.load(tmp_path / "stats.npz")
    assert set(cached.files) == {"mu", "sigma", "mu_s", "sigma_s", "pool3"} and cached["pool3"].shape == (6, 2048)
    # the cache as REF gives the same numbers (P/R from its pool3)
    again = fid.main([str(tmp_path / "stats.npz"), str(tmp_path / "samples.npz"), *common])
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert again[key] == pytest.approx(out[key], rel=1e-6, abs=1e-6), key
    # statistics without images as SAMPLES: IS, sFID and P/R are null, with warnings saying why
    np.savez(tmp_path / "mu_only.npz", mu=cached["mu"], sigma=cached["sigma"])
    with pytest.warns(UserWarning, match="Inception Score not computed"):
        partial = fid.main([str(tmp_path / "stats.npz"), str(tmp_path / "mu_only.npz"), *common])
    assert partial["inception_score"] is None and partial["sfid"] is None and partial["precision"] is None
    assert abs(partial["fid"]) < 1e-3  # FID(a, a); not ~1e-12 only because 6 samples give a rank-5 covariance
    assert "n/a" in capsys.readouterr().out


def test_cli_help_and_missing_weights(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        fid.main(["--help"])
    assert done.value.code == 0 and "--recon" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        fid.main(["a.npz", "b.npz", "--inception", str(tmp_path / "absent.pth")])
    assert fid.WEIGHTS_NAME in capsys.readouterr().err


class _FidStandInTokenizer(torch.nn.Module):
    """alitok's tokenizer API with a lossy identity: 4-bit codes per pixel."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(image_size=16)
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return (x * 15).round().long()

    def decode(self, codes):
        return codes.float() / 15


def test_rfid_mode_with_a_stand_in_tokenizer(fid_weights, tmp_path, monkeypatch):
    stand_in = types.SimpleNamespace(load_tokenizer=lambda path: _FidStandInTokenizer())
    monkeypatch.setitem(sys.modules, "alitok", stand_in)  # alitok.py may not exist yet
    folder = tmp_path / "real"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 30), (20, 50), (16, 16)]):  # mixed sizes: each is centre-cropped to 16
        Image.fromarray(_fid_images(1, h, w, seed=i)[0]).save(folder / f"{i}.png")
    np.savez(tmp_path / "real.npz", arr_0=_fid_images(3, 24, 20))
    for source in (folder, tmp_path / "real.npz"):
        out = fid.main(["--recon", "tok.pth", str(source), "--inception", str(fid_weights), "--device", "cpu",
                        "--json", str(tmp_path / "recon.json")])
        saved = json.loads((tmp_path / "recon.json").read_text())
        assert saved["num_images"] == 3 and saved["image_size"] == 16
        assert np.isfinite(saved["rfid"]) and saved["rfid"] > -1e-6
        assert 20 < saved["psnr"] < 45 and saved["psnr"] == pytest.approx(out["psnr"])


def test_adm_centre_crop():
    constant = Image.new("RGB", (64, 48), (10, 200, 30))  # halves once (48 >= 32), then bicubic to short side 16
    out = fid._adm_centre_crop(constant, 16)
    assert out.shape == (16, 16, 3) and (out == np.array([10, 200, 30], np.uint8)).all()
