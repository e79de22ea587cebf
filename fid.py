"""ImageNet generation metrics (IS, FID, sFID, Precision, Recall): a pure-PyTorch ADM evaluator.

Reproduces OpenAI's ADM evaluator (guided-diffusion/evaluations/evaluator.py, TensorFlow), which produced
AliTok's numbers and those of the papers it is compared with. The Inception network and its preprocessing are
inception.py; the sections here follow the rest of the evaluator spec (reference/EVALUATOR_SPEC.md): feature
extraction, metrics, file loading, evaluation and the command line.

  python fid.py VIRTUAL_imagenet256_labeled.npz samples.npz
  python fid.py imagenet_val/ --save-stats val_stats.npz      (cache statistics only)
  python fid.py --recon AliTok.pth imagenet_val/              (tokenizer rFID and PSNR)

Inputs (REF, SAMPLES, SOURCE, IMAGES):
  ADM npz    `arr_0` uint8 [N, H, W, 3] (NHWC, RGB); `arr_1` labels are ignored
  folder     data.IMAGE_EXTENSIONS, recursive, RGB, one common size; unreadable files are skipped with a
             warning and counted; read in a fixed-seed shuffled order (IS splits in order)
  stats npz  `mu`, `sigma` [, `mu_s`, `sigma_s`] are used for FID [sFID] as they are; `arr_0` (ADM reference
             batches) or `pool3` (from --save-stats) serve Precision/Recall
A metric whose inputs are missing (IS of a stats file, sFID without `mu_s`, P/R without images or `pool3`)
prints n/a, is null in the JSON, and a warning says why. REF and SAMPLES that both hold images (npz `arr_0` or
a folder) must hold one image size, or are refused before any feature is extracted (the Inception resizes
both to 299 px, so the scores would measure the size difference); a stats file carries no size and is not
checked.

--save-stats OUT.npz: mu, sigma, mu_s, sigma_s (float64) and the pool3 features of the first 10,000 images
(float32; ADM's reference size for P/R). With one PATH it only caches; with REF SAMPLES it also scores.
--recon CKPT IMAGES: reconstructs IMAGES (ADM centre crop to the tokenizer's size) through
checkpoints.load_tokenizer(CKPT); reports rFID (reconstructions vs originals, not comparable to gFID) and PSNR.

Weights: pt_inception-2015-12-05-6726825d.pth, the file pytorch-fid uses. Without --inception it is read from
the torch hub cache ($TORCH_HOME/hub/checkpoints), downloaded there from pytorch-fid's GitHub release on first
use and verified by SHA-256; --offline (or ALITOK_OFFLINE=1) forbids the download. --precision bf16 runs the
network in bfloat16 (faster on CPUs with bf16 units; published numbers use float32).
"""
import argparse
import os
import sys
import warnings
import zipfile

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import checkpoints
import data as D
import plumbing
import weights
from inception import DTYPES, MODES, load_inception, preprocess

PR_REFERENCE_SIZE = 10_000  # ADM's reference batches hold 10k images for Precision/Recall
FLAG_RULES = {"--batch-size": "count"}  # the range of each numeric flag (plumbing.check_flags)

# === Feature extraction: one forward pass gives every metric's features ===============================


def check_images(shape, dtype, where):
    """Raise ValueError unless (shape, dtype) describe uint8 NHWC RGB images [N, H, W, 3]."""
    expected = "uint8 images [N, H, W, 3] (NHWC, RGB, 0..255), as ADM's samplers write `arr_0`"
    if len(shape) != 4:
        raise ValueError(f"{where}: found an array of shape {tuple(shape)}; expected {expected}")
    if shape[-1] != 3:
        hint = " - it looks NCHW, transpose it with .transpose(0, 2, 3, 1)" if shape[1] == 3 else ""
        raise ValueError(f"{where}: found {shape[-1]} channels in shape {tuple(shape)}{hint}; expected {expected}")
    if np.dtype(dtype) != np.uint8:
        raise ValueError(f"{where}: found dtype {np.dtype(dtype)}; expected {expected} "
                         f"(convert floats in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8))")


@torch.inference_mode()
def extract(model, images, mode="adm", batch_size=50, device=None, progress=True):
    """Features of uint8 NHWC images [N, H, W, 3]: float32 numpy pool3 [N, 2048], spatial [N, 2023], logits [N, 1008].

    `images` is a numpy array or any sliceable with len() that returns such arrays (ImageFolder, NpzImages);
    `device=None` uses the model's device, otherwise the model is moved there. The network runs in the dtype
    of its weights (see inception.fold_batchnorm).
    """
    weight = next(model.parameters())
    device = weight.device if device is None else torch.device(device)
    model = model.to(device).eval()
    out = {"pool3": [], "spatial": [], "logits": []}
    with plumbing.exact_float32(), tqdm(total=len(images), disable=not progress, desc="inception", unit="img") as bar:
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size])
            bar.update(min(batch_size, len(images) - start))
            if len(batch) == 0:  # every file of this slice was unreadable
                continue
            check_images(batch.shape, batch.dtype, "extract")
            features = model(preprocess(torch.from_numpy(batch).to(device), mode).to(weight.dtype))
            for k, v in features.items():
                out[k].append(v.float().cpu().numpy())
    if not out["pool3"]:
        raise ValueError(f"{getattr(images, 'path', 'the images')}: no readable images to extract features from")
    return {k: np.concatenate(v) for k, v in out.items()}


# === Metrics: FID / sFID, Inception Score, Precision / Recall (float64 statistics) ====================


def statistics(features, where="features"):
    """Mean [D] and unbiased (N - 1) covariance [D, D] of features [N, D], both float64; `where` names their
    source in messages."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"{where}: {len(f) if f.ndim else 0} image(s) scored; statistics need at least 2 (FID is "
                         f"meant for thousands): give it more images")
    if len(f) < f.shape[1]:
        warnings.warn(f"ONLY {len(f)} SAMPLES FOR {f.shape[1]}-D FEATURES: the covariance is singular, so FID/sFID "
                      f"are biased upwards and not comparable to published numbers (use 50,000 samples)")
    return f.mean(0), np.cov(f, rowvar=False)


def _trace_sqrt_product(sigma1, sigma2):
    """tr sqrt(S1 S2) for PSD S1, S2, via the eigenvalues of the symmetric PSD sqrt(S1) S2 sqrt(S1)."""
    # S1 S2 is similar to sqrt(S1) S2 sqrt(S1) = V W^1/2 (V^T S2 V) W^1/2 V^T (S1 = V W V^T), itself similar to
    # B^T S2 B with B = V W^1/2: all share eigenvalues, and eigh on a symmetric matrix is stable (no
    # scipy.linalg.sqrtm: broken in SciPy 1.11.2-1.12, API change in 1.16).
    w, v = np.linalg.eigh(sigma1)
    keep = w > 0  # negative eigenvalues of a covariance are rounding; dropping them is clipping them to 0
    b = v[:, keep] * np.sqrt(w[keep])  # D, r: fewer columns when S1 is singular (N < D)
    m = b.T @ sigma2 @ b
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    # A negative eigenvalue -a would be an imaginary part sqrt(a) in sqrtm; ADM raises above 1e-3 and keeps
    # the real part below it.
    imaginary = np.sqrt(np.clip(-lam, 0, None)).max()
    if imaginary > 1e-3:
        raise ValueError(f"Imaginary component {imaginary}: a covariance is not positive semi-definite")
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, names=("the first statistics", "the second")):
    """Frechet distance of N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrt(S1 S2)), float;
    `names` name the two inputs in messages."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    for name, mu, sigma in ((names[0], mu1, sigma1), (names[1], mu2, sigma2)):
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{name}: its statistics contain NaN or inf; compute them again from the images "
                             f"(fid.py IMAGES --save-stats OUT.npz)")
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:  # ADM's fallback for a singular product: a small ridge on both diagonals
        warnings.warn(f"FID: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(d) * eps
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """IS of bias-free logits [N, 1008]: mean over consecutive groups of `split_size` of exp(E KL(p(y|x) || p(y)))."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    log_p = logits.log_softmax(1)  # softmax over all 1008 outputs; log-space keeps p log p finite
    scores = []
    for start in range(0, len(log_p), split_size):  # file order, as ADM: class-sorted files give a wrong IS
        part = log_p[start:start + split_size]
        log_marginal = part.exp().mean(0).log()
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores))


def _sq_distances(a, b):
    """Squared Euclidean distances [n, m] between rows of a [n, D] and b [m, D]."""
    return (a.pow(2).sum(1)[:, None] - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def _knn_radii(x, k, block):
    """Squared distance [N] from each row of x to its k-th nearest other row (self excluded)."""
    if len(x) <= k:
        raise ValueError(f"Precision/Recall need more than k={k} points per set; got {len(x)}")
    radii = []
    for i in range(0, len(x), block):
        # the k + 1 smallest of each column block contain the k + 1 smallest overall; index 0 is self (0)
        cands = [_sq_distances(x[i:i + block], x[j:j + block]).topk(min(k + 1, len(x[j:j + block])), 1,
                                                                       largest=False).values
                 for j in range(0, len(x), block)]
        radii.append(torch.cat(cands, 1).topk(k + 1, 1, largest=False).values[:, k])
    return torch.cat(radii)


def _within(points, centres, radii, block):
    """Bool [N]: whether each point lies within (<=) some centre's radius (squared distances)."""
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    for i in range(0, len(points), block):
        for j in range(0, len(centres), block):
            d = _sq_distances(points[i:i + block], centres[j:j + block])
            inside[i:i + block] |= (d <= radii[None, j:j + block]).any(1)
    return inside


@torch.no_grad()
def precision_recall(ref_pool3, sample_pool3, k=3, block=10000, device=None):
    """Improved precision and recall (k-NN manifolds) of samples [N, 2048] against reference features [M, 2048]."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = torch.as_tensor(np.asarray(ref_pool3), dtype=torch.float32, device=device)
    smp = torch.as_tensor(np.asarray(sample_pool3), dtype=torch.float32, device=device)
    with plumbing.exact_float32():
        ref_radii, smp_radii = _knn_radii(ref, k, block), _knn_radii(smp, k, block)
        precision = _within(smp, ref, ref_radii, block).double().mean().item()
        recall = _within(ref, smp, smp_radii, block).double().mean().item()
    return precision, recall


# === File loading: ADM npz, image folders, statistics npz =============================================

NPZ_ERRORS = plumbing.NPZ_ERRORS


def _unreadable_npz(path, error):
    return ValueError(f"{path}: not a readable .npz (truncated or corrupt? {type(error).__name__}: {error}); "
                      f"write it again with np.savez")


class NpzImages:
    """Lazy uint8 NHWC [N, H, W, 3] view of an npz's `arr_0`, read slice by slice (50k images need not fit in RAM)."""

    def __init__(self, path, key="arr_0"):
        self.path, self._zip = str(path), zipfile.ZipFile(path)
        self._file = self._zip.open(key + ".npy")
        version = np.lib.format.read_magic(self._file)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"{path}: `{key}` uses .npy format {version}; expected 1.0 or 2.0 (np.save's)")
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        self.shape, fortran_order, dtype = read(self._file)
        check_images(self.shape, dtype, f"{path} `{key}`")
        if fortran_order:
            raise ValueError(f"{path}: `{key}` is stored in Fortran order; save it C-contiguous")
        self._start, self._pos, self._row = self._file.tell(), 0, int(np.prod(self.shape[1:]))

    def __len__(self):
        return self.shape[0]

    def image_size(self):
        """(H, W) of the images in px."""
        return tuple(self.shape[1:3])

    def __getitem__(self, s):
        start, stop, _ = s.indices(len(self))
        n = max(stop - start, 0)
        if start != self._pos:  # zip members seek cheaply forwards; extract reads in order
            self._file.seek(self._start + start * self._row)
        try:
            data, self._pos = self._file.read(n * self._row), start + n
        except NPZ_ERRORS as error:
            raise _unreadable_npz(self.path, error) from error
        if len(data) != n * self._row:
            raise _unreadable_npz(self.path, EOFError(f"{len(data)} of {n * self._row} bytes at image {start}"))
        return np.frombuffer(bytearray(data), np.uint8).reshape(n, *self.shape[1:])  # writable, for torch

    def __del__(self):
        if hasattr(self, "_file"):
            self._file.close()
            self._zip.close()


class ImageFolder:
    """Lazy uint8 NHWC view of the images under `root` (recursive); unreadable files are skipped and counted."""

    def __init__(self, root, transform=None):
        files = D.list_images(root)
        if not files:
            raise ValueError(f"{root}: no {'/'.join(D.IMAGE_EXTENSIONS)} images found (searched recursively)")
        # A folder has no meaningful order and is often sorted by class (one subfolder each); IS splits in
        # order, so shuffle with a fixed seed to keep every 5,000-image split class-balanced.
        self.files = [files[i] for i in np.random.default_rng(0).permutation(len(files))]
        self.path, self.transform, self.skipped, self._shape = str(root), transform, [], None

    def __len__(self):
        return len(self.files)

    def image_size(self):
        """(H, W) in px of the first image that reads (headers only without a transform), or None if none does."""
        for p in self.files:
            try:
                if self.transform is None:
                    with Image.open(p) as im:
                        return im.height, im.width
                return np.asarray(self.transform(D.load_image(p))).shape[:2]
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                continue    # counted as skipped when the images are read
        return None

    def __getitem__(self, s):
        arrays = []
        for p in self.files[s]:
            try:
                im = D.load_image(p)
                a = np.asarray(self.transform(im) if self.transform else im, dtype=np.uint8)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                warnings.warn(f"skipping unreadable image {p}: {e}")
                self.skipped.append(str(p))
                continue
            self._shape = self._shape or a.shape
            if a.shape != self._shape:
                raise ValueError(f"{p} is {a.shape[1]}x{a.shape[0]} but earlier images are {self._shape[1]}x"
                                 f"{self._shape[0]}: the images of a folder must share one size (centre-crop them)")
            arrays.append(a)
        return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)


STAT_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


def load_source(path, transform=None):
    """Open REF or SAMPLES: a folder, ADM npz (`arr_0`) or stats npz (`mu`, `sigma`[, `mu_s`, `sigma_s`, `pool3`]).

    Returns a dict with `path`, `images` (lazy uint8 NHWC, or None) and the statistics the file holds.
    """
    path = str(path)
    if os.path.isdir(path):
        return {"path": path, "images": ImageFolder(path, transform)}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if not path.endswith(".npz"):
        raise ValueError(f"{path}: expected a folder of images or an .npz (ADM `arr_0` images or `mu`/`sigma` stats)")
    src = {"path": path, "images": None}
    with plumbing.open_npz(path, "", "write it again with np.savez") as data:
        keys = set(data.files)
        if "mu" not in keys and "arr_0" not in keys:
            raise ValueError(f"{path}: found keys {sorted(keys)}; expected `arr_0` (uint8 images [N, H, W, 3], "
                             f"as ADM writes them) or `mu` and `sigma` (Inception statistics)")
        for mu, sigma in (("mu", "sigma"), ("mu_s", "sigma_s")):
            if mu in keys and sigma not in keys:
                raise ValueError(f"{path}: found `{mu}` but no `{sigma}`; statistics need both")
        for key, shape in STAT_SHAPES.items():
            if key in keys:  # a file's own statistics win over recomputing them from its `arr_0`
                src[key] = data[key].astype(np.float64)
                if src[key].shape != shape:
                    raise ValueError(f"{path}: `{key}` has shape {src[key].shape}; expected {shape}")
        if "pool3" in keys:
            src["pool3"] = data["pool3"].astype(np.float32)
    if "arr_0" in keys:
        src["images"] = NpzImages(path)
    return src


def check_same_size(ref, smp):
    """Raise ValueError when REF and SAMPLES both hold images and their sizes differ (stats files carry none)."""
    sizes = [None if s["images"] is None else s["images"].image_size() for s in (ref, smp)]
    if None not in sizes and sizes[0] != sizes[1]:
        (h, w), (h2, w2) = sizes
        raise ValueError(f"{ref['path']} holds {w}x{h} px images but {smp['path']} holds {w2}x{h2} px: the metrics "
                         f"compare images of one size (both are resized to 299 px for the Inception, so the scores "
                         f"would measure the size difference); resize or centre-crop one set to the other's size")


def complete(src, model, need_logits=False, mode="adm", batch_size=50, device=None):
    """Fill in the features / statistics a source lacks (pool3, mu, sigma, mu_s, sigma_s, logits) from its images."""
    src = dict(src)
    needed = ["mu", "mu_s", "pool3"] + (["logits"] if need_logits else [])
    if src["images"] is None or all(k in src for k in needed):
        return src
    print(f"computing Inception features of {src['path']}", file=sys.stderr)
    f = extract(model, src["images"], mode, batch_size, device)
    skipped = getattr(src["images"], "skipped", [])
    if skipped:
        warnings.warn(f"{src['path']}: {len(skipped)} unreadable image(s) skipped; scored {len(f['pool3'])}")
    src.update(n=len(f["pool3"]), skipped=len(skipped), logits=f["logits"], pool3=src.get("pool3", f["pool3"]))
    for mu, sigma, feats in (("mu", "sigma", "pool3"), ("mu_s", "sigma_s", "spatial")):
        if mu not in src:
            src[mu], src[sigma] = statistics(f[feats], src["path"])
    return src


def save_stats(src, out, job=None):
    """Cache a completed source as npz: mu, sigma, mu_s, sigma_s (float64), pool3 of <= 10,000 images (for P/R),
    and the `job` that made it (plumbing.claim)."""
    arrays = {k: src[k] for k in STAT_SHAPES if k in src}
    if "pool3" in src:  # ADM's reference batches use 10k images for P/R; more would only grow the file
        arrays["pool3"] = np.asarray(src["pool3"][:PR_REFERENCE_SIZE], np.float32)
    plumbing.save_npz(out, job=job, **arrays)


# === Evaluation and command line ======================================================================


def scores(ref, smp, device=None):
    """ADM's five numbers from completed sources (see `complete`); a metric whose inputs are missing is None."""
    out = dict.fromkeys(["inception_score", "fid", "sfid", "precision", "recall"])
    names = (ref["path"], smp["path"])
    out["fid"] = frechet_distance(ref["mu"], ref["sigma"], smp["mu"], smp["sigma"], names=names)
    if "logits" in smp:  # ADM scores IS on the samples only
        out["inception_score"] = inception_score(smp["logits"])
    if "mu_s" in ref and "mu_s" in smp:
        out["sfid"] = frechet_distance(ref["mu_s"], ref["sigma_s"], smp["mu_s"], smp["sigma_s"], names=names)
    if "pool3" in ref and "pool3" in smp:
        out["precision"], out["recall"] = precision_recall(ref["pool3"], smp["pool3"], device=device)
    for metric, key, sources in (("Inception Score", "logits", [smp]), ("sFID", "mu_s", [ref, smp]),
                                 ("Precision/Recall", "pool3", [ref, smp])):
        lacking = [s["path"] for s in sources if key not in s]
        if lacking:
            warnings.warn(f"{metric} not computed (null): {lacking} hold(s) neither images nor `{key}`")
    return out | {"num_ref": ref.get("n"), "num_samples": smp.get("n"),
                  "skipped_ref": ref.get("skipped", 0), "skipped_samples": smp.get("skipped", 0)}


def evaluate(ref_path, samples_path, model, mode="adm", batch_size=50, device=None):
    """IS, FID, sFID, Precision, Recall of SAMPLES against REF (each a folder, ADM npz or statistics npz)."""
    ref = complete(load_source(ref_path), model, False, mode, batch_size, device)
    smp = complete(load_source(samples_path), model, True, mode, batch_size, device)
    return scores(ref, smp, device)


def psnr(a, b):
    """Per-image PSNR in dB [N] between uint8 images [N, H, W, C] (peak 255); inf where identical."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0 ** 2 / mse)


@torch.no_grad()
def reconstruction_scores(tokenizer, images_path, model, mode="adm", batch_size=50, device=None):
    """rFID, mean PSNR (dB, on uint8) and codebook usage (fraction of codes used) of a tokenizer module's
    reconstructions (encode -> decode, images in [0, 1]) against the originals, ADM-centre-cropped to
    tokenizer.config.image_size; moves it to `device`."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok = tokenizer.to(device).eval()
    size = tok.config.image_size
    # the training pipeline's crop: rFID sees what the tokenizer saw
    crop = lambda pil, side: np.asarray(D.center_crop_adm(pil, side), dtype=np.uint8)
    src = load_source(images_path, transform=lambda pil: crop(pil, size))
    images = src["images"]
    if images is None:
        raise ValueError(f"{images_path}: --recon needs real images (a folder or an npz with `arr_0`), not statistics")
    real_f, rec_f, psnrs, counts = [], [], [], torch.zeros(tok.config.codebook_size, device=device)
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruct", unit="batch"):
        real = np.asarray(images[start:start + batch_size])
        if len(real) == 0:
            continue
        if real.shape[1:3] != (size, size):  # npz images of another size: crop them like a folder's
            real = np.stack([crop(Image.fromarray(a), size) for a in real])
        x = torch.from_numpy(real).to(device).permute(0, 3, 1, 2).float() / 255  # B, 3, H, W in [0, 1]
        codes = tok.encode(x)
        counts += torch.bincount(codes.flatten(), minlength=len(counts))
        rec = plumbing.to_uint8(tok.decode(codes))  # scored as saved images: rounded uint8
        psnrs.append(psnr(real, rec))
        real_f.append(extract(model, real, mode, batch_size, device, progress=False)["pool3"])
        rec_f.append(extract(model, rec, mode, batch_size, device, progress=False)["pool3"])
    if not psnrs:
        raise ValueError(f"{images_path}: no readable images")
    rfid = frechet_distance(*statistics(np.concatenate(real_f), images_path),
                            *statistics(np.concatenate(rec_f), f"reconstructions of {images_path}"),
                            names=(images_path, f"reconstructions of {images_path}"))
    return {"rfid": rfid, "psnr": float(np.concatenate(psnrs).mean()), "num_images": int(sum(map(len, psnrs))),
            "codebook_usage": float((counts > 0).float().mean()), "skipped": len(getattr(images, "skipped", [])),
            "image_size": size, "mode": mode}


def build_parser():
    """The command-line interface (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="REF SAMPLES; or SOURCE with --save-stats; or IMAGES "
                   "with --recon")
    p.add_argument("--inception", metavar="PTH", help=f"the FID Inception weights ({weights.INCEPTION_WEIGHTS}); default: "
                   f"the torch hub cache's copy, downloaded on first use")
    p.add_argument("--offline", action="store_true", help=f"never download (as {weights.OFFLINE_ENV}=1)")
    p.add_argument("--mode", choices=MODES, default="adm",
                   help="adm (default): TF1 bilinear resize and (x - 128) / 128, as the ADM evaluator and published "
                   "numbers; pytorch-fid: torch bilinear resize, as pytorch-fid")
    p.add_argument("--precision", choices=DTYPES, default="fp32",
                   help="fp32 (default; published numbers) or bf16 (faster where the hardware has bf16 units)")
    p.add_argument("--batch-size", type=int, default=50, help="images per forward pass (default 50)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", metavar="OUT.json", help="also write the results as JSON (null for n/a)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="cache statistics (see above)")
    p.add_argument("--recon", metavar="TOKENIZER_CKPT", help="score a tokenizer's reconstructions of IMAGES")
    p.add_argument("--overwrite", action="store_true", help="replace a --json or --save-stats file that holds "
                   "something else than this job's output (another program's file, other inputs or settings)")
    return p


def check_outputs(args):
    """Refuse, before any work, a --json or --save-stats file that another job made (plumbing.claim; --overwrite
    replaces it), and a --save-stats or --json that is one of the inputs. (json job, stats job)."""
    inputs = [os.path.abspath(p) for p in args.paths + ([args.recon] if args.recon else [])]
    for flag, out in (("--json", args.json), ("--save-stats", args.save_stats)):
        if out and os.path.abspath(out) in inputs:
            raise ValueError(f"{flag} {out} is an input of this run: it would be replaced by the results; choose "
                             f"another {flag}")
    json_job = {"program": "fid.py", "inputs": inputs, "mode": args.mode, "precision": args.precision}
    stats_job = {"program": "fid.py --save-stats", "source": inputs[0], "mode": args.mode,
                 "precision": args.precision}
    for flag, out, job in (("--json", args.json, json_job), ("--save-stats", args.save_stats, stats_job)):
        if out:
            plumbing.claim(out, job, flag, args.overwrite)
    return json_job, stats_job


def run(argv=None):
    """The command line's work; returns the result dict (main() is its exit-status wrapper)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    n = len(args.paths)
    if args.recon and n != 1:
        parser.error("--recon takes one IMAGES path (a folder or npz of real images)")
    if not args.recon and n != 2 and not (args.save_stats and n == 1):
        parser.error("give REF and SAMPLES (or one SOURCE with --save-stats)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    json_job, stats_job = check_outputs(args)
    # every input is opened (and checked) before the first image is run through the network
    tokenizer = checkpoints.load_tokenizer(args.recon, source=f"--recon {args.recon!r}") if args.recon else None
    sources = [] if args.recon else [load_source(path) for path in args.paths]
    if len(sources) == 2:
        check_same_size(*sources)
    model = load_inception(args.inception, args.offline, args.precision, device)
    common = dict(mode=args.mode, batch_size=args.batch_size, device=device)
    if args.recon:
        result = reconstruction_scores(tokenizer, args.paths[0], model, **common)
        rows = [("rFID", "rfid"), ("PSNR", "psnr")]
    else:
        ref = complete(sources[0], model, False, **common)
        if args.save_stats:
            save_stats(ref, args.save_stats, stats_job)
            print(f"saved statistics of {args.paths[0]} to {args.save_stats}", file=sys.stderr)
        if n == 1:
            result, rows = {"saved_stats": args.save_stats, "num_images": ref.get("n")}, []
        else:
            smp = complete(sources[1], model, True, **common)
            result = scores(ref, smp, device) | {"mode": args.mode}
            rows = [("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
                    ("Precision", "precision"), ("Recall", "recall")]
    if rows:
        print("Computing evaluations...")
    for label, key in rows:
        print(f"{label}: {'n/a' if result[key] is None else result[key]}")
    if args.json:
        plumbing.save_json(args.json, result | {"inception_precision": args.precision}, job=json_job)
    return result


def main(argv=None):
    """Run the command line; 0 on success (bad input raises; plumbing.cli turns it into a message and status 2)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
