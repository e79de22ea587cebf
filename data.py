"""Data for AliTok: ADM preprocessing, the datasets, and ten-crop pre-tokenization for the generator.

Read beside "AliTok" (arXiv 2506.05289), Sec. 4 implementation details and the released training recipe:
images enter the tokenizer in [0, 1]; it trains on the original's augmentation (shorter side resized,
random crop, random flip) and is evaluated on the ADM centre crop; the generator trains on ImageNet codes
pre-tokenized with ten-crop (ADM crop to int(256 * 1.1) = 281 px, four corner and centre 256 crops and
their mirror images), one of the 10 code sequences drawn at random per visit.

Sources: built-in procedural shapes (the default; no download), ImageNet-layout image folders, and
uint8 npz arrays. Image items are (image float [3, H, W] in [0, 1], label int); pre-tokenized items are
(codes int64 [T], label int).
"""
import colorsys
import functools
import hashlib
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from plumbing import Stopped, barrier, exact_float32, is_distributed, job_of, open_npz, save_npz

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # matched case-insensitively
TEN_CROP_SCALE = 1.1  # ALITOK_SPEC.md 2, "Training recipe": "ADM centre crop to 281 px (int(256 * 1.1))"
TEN_CROP_ORDER = ("top_left", "top_right", "bottom_left", "bottom_right", "centre",
                  "top_left_flipped", "top_right_flipped", "bottom_left_flipped", "bottom_right_flipped",
                  "centre_flipped")
CODES_META = ("n_tokens", "codebook_size", "image_size", "num_classes")  # scalar fields of a codes file


# ----------------------------------------------------------------------------------------------------
# Image files and tensors
# ----------------------------------------------------------------------------------------------------

def load_image(path):
    """Read an image file fully decoded as a PIL RGB image; raises (OSError, ...) if it is unreadable."""
    with Image.open(path) as image:
        return image.convert("RGB")  # convert() decodes now, so a broken file fails here, not later


def uint8_to_tensor(array):
    """uint8 [H, W, 3] array -> float [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float().div_(255)


def pil_to_tensor(pil_image):
    """PIL image -> float [3, H, W] in [0, 1]."""
    return uint8_to_tensor(np.asarray(pil_image.convert("RGB"), dtype=np.uint8))


# ----------------------------------------------------------------------------------------------------
# ADM centre crop (reference Sec. 3) and ten-crop (training recipe)
# ----------------------------------------------------------------------------------------------------

def center_crop_adm(pil_image, size):
    """ADM preprocessing: PIL image of any size -> PIL [size, size] (box halving, bicubic, centre crop)."""
    image = pil_image
    # Halving with a box filter first keeps bicubic from aliasing when it shrinks a lot in one step.
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), resample=Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def ten_crop_tensor(images, size):
    """float [..., 3, S, S] (S >= size) -> float [..., 10, 3, size, size] in TEN_CROP_ORDER."""
    s = images.shape[-1]
    assert images.shape[-2] == s >= size, f"need square images of side >= {size}, got {tuple(images.shape)}"
    far, mid = s - size, (s - size) // 2
    corners = [(0, 0), (0, far), (far, 0), (far, far), (mid, mid)]  # (top, left) of the five crops
    crops = [images[..., t:t + size, l:l + size] for t, l in corners]
    return torch.stack(crops + [c.flip(-1) for c in crops], dim=-4)


def ten_crop(pil_image, size):
    """PIL image -> float [10, 3, size, size] in [0, 1]: ADM crop to int(size * 1.1), then the crops
    top-left, top-right, bottom-left, bottom-right, centre, then the horizontal flips of those five in the
    same order (TEN_CROP_ORDER)."""
    big = center_crop_adm(pil_image, int(size * TEN_CROP_SCALE))
    return ten_crop_tensor(pil_to_tensor(big), size)


# ----------------------------------------------------------------------------------------------------
# The tokenizer's training view, ALITOK_SPEC.md 1, "Training, as the original code does it": "short side resized
# to 256 (bilinear), random 256 crop, random flip"; randomness from a key, not from a global RNG
# ----------------------------------------------------------------------------------------------------

def resize_short_side(pil_image, size):
    """PIL image -> PIL whose shorter side is `size` (bilinear; the longer side int(size * long / short), as
    torchvision's Resize(size))."""
    w, h = pil_image.size
    if min(w, h) == size:
        return pil_image
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return pil_image.resize(new, resample=Image.BILINEAR)


def random_crop_flip(image, size, rng):
    """float [3, H, W] (H, W >= size) -> [3, size, size]: a crop at a random offset, mirrored left-right with
    probability 1/2; rng: a numpy Generator."""
    top = int(rng.integers(image.shape[1] - size + 1))
    left = int(rng.integers(image.shape[2] - size + 1))
    image = image[:, top:top + size, left:left + size]
    return image.flip(-1) if rng.random() < 0.5 else image


def split_item(item):
    """A dataset item -> (index, numpy Generator or None). An int asks for the evaluation view (the ADM centre
    crop); (index, key) asks for the training view, its randomness drawn from np.random.default_rng(key), so
    that a key made of (seed, step, position) makes every augmentation reproducible on resume."""
    if isinstance(item, (tuple, list)):
        return int(item[0]), np.random.default_rng(item[1])
    return int(item), None


def crop_image(pil_image, size, rng=None):
    """PIL image -> float [3, size, size] in [0, 1]: the ADM centre crop (rng None), else the tokenizer's
    training view: the shorter side resized to size (bilinear), a random crop, a random flip."""
    if rng is None:
        return pil_to_tensor(center_crop_adm(pil_image, size))
    return random_crop_flip(pil_to_tensor(resize_short_side(pil_image, size)), size, rng)


def _spaced_indices(n_total, n):
    """n indices spread evenly over range(n_total), so every class appears; all if n is None or >= n_total."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.arange(n) * n_total // n


# ----------------------------------------------------------------------------------------------------
# Training order: each step's global batch and its items' augmentation keys, functions of (seed, step)
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    """The order of the n items in an epoch: a function of (seed, epoch), so resume reproduces it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def global_batch_indices(n, global_batch, seed, step):
    """Dataset indices [global_batch] of a step: epoch permutations, drop last, one epoch after another."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {n} items, fewer than the global batch {global_batch}; "
                         f"lower --batch-size or use more images")
    epoch, j = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[j * global_batch:(j + 1) * global_batch]


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of each step's global batch, steps start..stop-1, as dataset items (index, key):
    key = (seed, step, position in the global batch) seeds the item's augmentation (data.split_item)."""

    def __init__(self, n, global_batch, seed, start, stop, rank, world):
        self.n, self.gb, self.seed, self.start, self.stop = n, global_batch, seed, start, stop
        self.share = range(rank * global_batch // world, (rank + 1) * global_batch // world)

    def __iter__(self):
        for step in range(self.start, self.stop):
            indices = global_batch_indices(self.n, self.gb, self.seed, step).tolist()
            yield [(indices[pos], (self.seed, step, pos)) for pos in self.share]

    def __len__(self):
        return self.stop - self.start


# ----------------------------------------------------------------------------------------------------
# Built-in procedural shapes: 10 learnable classes drawn from (seed, split, index), no download
# ----------------------------------------------------------------------------------------------------

SHAPES_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                  "stripes", "checkerboard", "diagonal", "two_dots", "diamond")
SHAPES_SPLITS = ("train", "val", "test")  # each split is its own random stream
SHAPES_DEFAULT_N = 10_000
# Class hues step 108 degrees, so classes next to each other in the list never share a colour family.
_SHAPES_HUES = tuple((108 * k % 360) / 360 for k in range(len(SHAPES_CLASSES)))


def _shape_sdf(label, x, y, r):
    """Signed distance (< 0 inside) of class `label` with size r; x [1, W], y [H, 1] relative to the centre,
    in units where the image spans [-1, 1] and y grows downwards."""
    ax, ay, root2 = np.abs(x), np.abs(y), np.sqrt(2)
    if label == 0:  # circle
        return np.hypot(x, y) - r
    if label == 1:  # square
        return np.maximum(ax, ay) - 0.85 * r
    if label == 2:  # triangle, apex up: three half-planes, inradius 0.6 r
        return np.max([np.cos(a) * x + np.sin(a) * y for a in np.radians([90, 210, 330])], axis=0) - 0.6 * r
    if label == 3:  # plus sign: union (min) of two bars
        bar = 0.3 * r
        return np.minimum(np.maximum(ax - r, ay - bar), np.maximum(ax - bar, ay - r))
    if label == 4:  # ring
        return np.abs(np.hypot(x, y) - r) - 0.25 * r
    if label == 5:  # horizontal stripes of period r over the whole image
        return (np.abs((y / r) % 1 - 0.5) - 0.25) * r
    if label == 6:  # checkerboard of period 1.5 r over the whole image
        p = 1.5 * r
        u, v = 0.25 - np.abs((x / p) % 1 - 0.5), 0.25 - np.abs((y / p) % 1 - 0.5)
        return -np.sign(u * v) * np.minimum(np.abs(u), np.abs(v)) * p
    if label == 7:  # band along the top-left to bottom-right diagonal
        return np.abs(x - y) / root2 - 0.4 * r
    if label == 8:  # two dots side by side
        return np.minimum(np.hypot(x - 0.8 * r, y), np.hypot(x + 0.8 * r, y)) - 0.45 * r
    return (ax + ay - 1.1 * r) / root2  # diamond


def render_shape(seed, index, size, split="train", antialias=True):
    """Built-in sample: (image float32 [3, size, size] in [0, 1], label = index % 10); a pure function of
    (seed, split, index), drawn at `size` directly (no resampling)."""
    label = index % len(SHAPES_CLASSES)
    rng = np.random.default_rng([seed, SHAPES_SPLITS.index(split), index])
    cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.3, 0.5)
    # Class colour with a little jitter on a desaturated, vertically graded background that is light for
    # odd classes and dark for even ones: classes whose hues are neighbours (36 degrees) then differ in it.
    light = label % 2 == 1
    fg = colorsys.hsv_to_rgb((_SHAPES_HUES[label] + rng.uniform(-1, 1) / 30) % 1, rng.uniform(0.65, 0.95),
                             rng.uniform(0.55, 0.8) if light else rng.uniform(0.75, 1.0))
    bg = [colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.25),
                              rng.uniform(0.75, 0.95) if light else rng.uniform(0.05, 0.3)) for _ in range(2)]
    u = (np.arange(size) + 0.5) * (2 / size) - 1  # pixel centres in [-1, 1]
    x, y = u[None, :], u[:, None]
    d = np.broadcast_to(_shape_sdf(label, x - cx, y - cy, r), (size, size))
    pixel = 2 / size
    # Coverage of each pixel: a one-pixel linear ramp across the edge is cheap anti-aliasing.
    alpha = np.clip(0.5 - d / pixel, 0, 1) if antialias else (d <= 0).astype(np.float64)
    t = ((y + 1) / 2)[..., None]  # [H, 1, 1] top-to-bottom blend weight
    background = np.asarray(bg[0]) * (1 - t) + np.asarray(bg[1]) * t  # [H, 1, 3]
    image = background * (1 - alpha[..., None]) + np.asarray(fg) * alpha[..., None]  # [H, W, 3]
    return image.transpose(2, 0, 1).astype(np.float32), label


class ShapesDataset(Dataset):
    """Procedural shapes: items (image float [3, S, S] in [0, 1], label int); item i fixed by (seed, split, i).
    Drawn square at S, so the training view (split_item) is the image or its mirror."""

    def __init__(self, image_size, n_images=SHAPES_DEFAULT_N, seed=0, split="train", antialias=True):
        if split not in SHAPES_SPLITS:
            raise ValueError(f"shapes split {split!r}; expected one of {SHAPES_SPLITS}")
        self.image_size, self.n_images, self.seed = image_size, n_images, seed
        self.split, self.antialias = split, antialias
        self.num_classes, self.class_names = len(SHAPES_CLASSES), list(SHAPES_CLASSES)

    def __len__(self):
        return self.n_images

    def __getitem__(self, item):
        i, rng = split_item(item)
        if not 0 <= i < self.n_images:
            raise IndexError(f"index {i} out of range for {self.n_images} images")
        image, label = render_shape(self.seed, i, self.image_size, self.split, self.antialias)
        image = torch.from_numpy(image)
        return (image if rng is None else random_crop_flip(image, self.image_size, rng)), label


# ----------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout: root/<class>/<image>)
# ----------------------------------------------------------------------------------------------------

def list_images(folder):
    """Sorted paths of the image files under `folder` (recursive; hidden files and folders skipped)."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(parent, f) for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def _unreadable(path):
    """None if PIL recognises the file's header, else the reason as text (cheap: no pixel decoding)."""
    try:
        with Image.open(path) as image:
            image.size
        return None
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        return f"{type(error).__name__}: {error}"


class ImageFolderDataset(Dataset):
    """ImageNet-layout folder: items (image float [3, S, S] in [0, 1], label = index of the sorted class
    folder); the ADM centre crop, or the training view for (index, key) items (split_item). Unreadable files
    are skipped with a warning; more than max_bad_fraction of them raises ValueError."""

    def __init__(self, root, image_size, max_bad_fraction=0.01, verify=True, n_images=None):
        self.root, self.image_size = root, image_size
        self.max_bad_fraction = max_bad_fraction
        folders = [e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")]
        self.class_names = sorted(folders)
        if not self.class_names:
            raise ValueError(f"{root}: no class sub-folders; expected root/<class name>/<image files> "
                             "(ImageNet layout)")
        self.num_classes = len(self.class_names)
        files = [(path, label) for label, name in enumerate(self.class_names)
                 for path in list_images(os.path.join(root, name))]
        if not files:
            raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
        files = [files[i] for i in _spaced_indices(len(files), n_images)]
        self.n_files = len(files)
        # Header check up front: cheap, and a broken dataset fails at start rather than hours in.
        checking = tqdm(files, desc="checking images", disable=len(files) < 10_000)
        reasons = [_unreadable(path) for path, _ in checking] if verify else [None] * len(files)
        self.skipped = {p: why for (p, _), why in zip(files, reasons) if why}  # path -> reason, at start
        self.failed = {}  # path -> reason, when decoding (per process: each DataLoader worker has its own)
        self.samples = [item for item, why in zip(files, reasons) if not why]
        if self.skipped:
            warnings.warn(f"{root}: skipped {len(self.skipped)} unreadable of {self.n_files} image files: "
                          + self._list_bad(self.skipped))
        self._check_bad_fraction()

    def _list_bad(self, bad, shown=10):
        """'path (reason); ...' for the first `shown` entries of {path: reason}."""
        items = [f"{p} ({why})" for p, why in list(bad.items())[:shown]]
        return "; ".join(items) + (f"; ... and {len(bad) - shown} more" if len(bad) > shown else "")

    def _check_bad_fraction(self):
        n_bad = len(self.skipped) + len(self.failed)
        if n_bad > self.max_bad_fraction * self.n_files or not self.samples:
            raise ValueError(f"{self.root}: {n_bad} of {self.n_files} image files are unreadable, more "
                               f"than max_bad_fraction={self.max_bad_fraction:.2%}: "
                               + self._list_bad({**self.skipped, **self.failed}))

    def __len__(self):
        return len(self.samples)

    def load(self, i):
        """(PIL RGB image, label) of sample i; a file that fails to decode is recorded, the next one used."""
        for step in range(len(self.samples)):
            path, label = self.samples[(i + step) % len(self.samples)]
            if path in self.failed:
                continue
            try:
                return load_image(path), label
            except Exception as error:  # a long training run must survive one truncated JPEG
                self.failed[path] = f"{type(error).__name__}: {error}"
                warnings.warn(f"{path}: unreadable ({self.failed[path]}); using the next image instead")
                self._check_bad_fraction()
        raise ValueError(f"{self.root}: no readable image left")

    def __getitem__(self, item):
        i, rng = split_item(item)
        image, label = self.load(i)
        return crop_image(image, self.image_size, rng), label


# ----------------------------------------------------------------------------------------------------
# npz arrays: x_<split>/y_<split> (CIFAR style) or arr_0/arr_1 (ADM reference-batch style)
# ----------------------------------------------------------------------------------------------------

def _check_arrays(path, images, labels, x_key, y_key):
    """Raise ValueError unless images are uint8 [N, H, W, 3] and labels integer [N] >= 0."""
    expected = f"expected {x_key!r} uint8 [N, H, W, 3] (NHWC, values 0..255)"
    shape = tuple(images.shape)
    if images.ndim != 4:
        raise ValueError(f"{path}: {x_key!r} has shape {shape}; {expected}")
    if images.shape[-1] != 3:
        hint = " (this looks like NCHW: use x.transpose(0, 2, 3, 1))" if images.shape[1] == 3 else ""
        raise ValueError(f"{path}: {x_key!r} has shape {shape} with {images.shape[-1]} channels last{hint}; "
                         + expected)
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: {x_key!r} has dtype {images.dtype}; {expected} "
                         "(from floats in [0, 1]: (x * 255).round().astype(np.uint8))")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: {y_key!r} is {labels.dtype} {tuple(labels.shape)}; "
                         "expected integer labels [N]")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images in {x_key!r} but {len(labels)} labels in {y_key!r}; "
                         "expected one label per image")
    if len(images) == 0 or labels.min() < 0:
        raise ValueError(f"{path}: expected at least one image and labels >= 0")


def check_label_bulk(labels, n_classes, where, remedy):
    """Raise ValueError when labels without class names would make n_classes classes far beyond their bulk:
    n_classes > 4 x (the median label + 1) with fewer than half of the ids 0..n_classes-1 in use (a stray label
    such as 100000 among 0..9, even twice among 80 images, would build a generator with 100,001 class
    embeddings). The median, unlike a high percentile, moves only when half the labels do."""
    bulk = 2 * (int(np.median(labels)) + 1)                    # ids 0..bulk-1 hold at least half the labels
    used = len(np.unique(labels))
    if n_classes > 2 * bulk and used < n_classes / 2:
        top, inside = int(labels.max()), labels[labels < bulk]
        raise ValueError(f"{where}: label {top} ({int((labels == top).sum())} of {len(labels)} images) would make "
                         f"{n_classes} classes, but {len(inside)} of the {len(labels)} labels lie in "
                         f"0..{int(inside.max())} and only {used} of the ids 0..{n_classes - 1} occur; {remedy}")


def read_npz_images(path, split="train"):
    """(images uint8 [N, H, W, 3], labels int64 [N], class names or None) from x_<split>/y_<split>, else
    arr_0/arr_1 (a single-split ADM file serves any split); ValueError on other layouts or a damaged file."""
    with open_npz(path, "data npz (--data)", "write it again, or pass another --data") as f:
        keys = set(f.files)
        if f"x_{split}" in keys:
            x_key, y_key = f"x_{split}", f"y_{split}"
        elif "arr_0" in keys:
            x_key, y_key = "arr_0", "arr_1"
        else:
            raise ValueError(f"{path}: keys {sorted(keys)}; expected x_{split} and y_{split}, or arr_0 "
                             "(images) and arr_1 (labels) as in ADM reference batches")
        if y_key not in keys:
            raise ValueError(f"{path}: images {x_key!r} but no labels {y_key!r}; expected integer labels [N]")
        images, labels = f[x_key], f[y_key]
        names = _string_array(f, "classes")
    _check_arrays(path, images, labels, x_key, y_key)
    return images, labels.astype(np.int64), names


def _string_array(npz, key):
    """npz[key] as a list of str, or None when absent or not a string array (object arrays need pickle)."""
    try:
        values = npz[key] if key in npz.files else None
    except ValueError:  # an object array: numpy refuses to unpickle it, and we do not ask it to
        return None
    return [str(v) for v in values] if values is not None and values.dtype.kind in "US" else None


class ArrayDataset(Dataset):
    """uint8 npz images: items (image float [3, S, S] in [0, 1], label int); the ADM centre crop when the
    stored size is not S, or the training view for (index, key) items (split_item)."""

    def __init__(self, path, image_size, split="train", n_images=None):
        images, labels, names = read_npz_images(path, split)
        keep = _spaced_indices(len(images), n_images)
        self.images, self.labels = images[keep], labels[keep]
        self.path, self.image_size = path, image_size
        self.num_classes = len(names) if names else int(labels.max()) + 1
        if not names:
            check_label_bulk(labels, self.num_classes, f"{path} (labels without class names)",
                             "fix the labels, or store the class names as `classes` in the npz (a string "
                             "array, one name per id) if these ids are meant")
        if labels.max() >= self.num_classes:
            raise ValueError(f"{path}: label {labels.max()} but only {self.num_classes} class names")
        self.class_names = names or [str(c) for c in range(self.num_classes)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        i, rng = split_item(item)
        array = self.images[i]
        if rng is None and array.shape[:2] == (self.image_size, self.image_size):
            return uint8_to_tensor(array), int(self.labels[i])     # stored at size: no resampling
        return crop_image(Image.fromarray(array), self.image_size, rng), int(self.labels[i])


# ----------------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------------

def build_dataset(source, image_size, seed=0, n_images=None, split="train", max_bad_fraction=0.01):
    """Dataset of (image float [3, image_size, image_size] in [0, 1], label int) with .num_classes and
    .class_names; an int item gives the ADM centre crop, an (index, key) item the training view
    (split_item). source: "shapes" (built-in), an ImageNet-layout folder, or a .npz file. seed and split
    pick the shapes stream; split picks x_<split> of an npz; n_images keeps that many, evenly spaced
    (shapes default 10,000); max_bad_fraction: folders only."""
    if isinstance(source, str) and source == "shapes":
        return ShapesDataset(image_size, SHAPES_DEFAULT_N if n_images is None else n_images, seed, split)
    path = os.fspath(source)
    if os.path.isdir(path):
        return ImageFolderDataset(path, image_size, max_bad_fraction, n_images=n_images)
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        return ArrayDataset(path, image_size, split, n_images)
    expected = ("expected 'shapes' (built-in), a folder root/<class>/<images> (ImageNet layout), or a .npz "
                "file of uint8 [N, H, W, 3] images with labels")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data source {path!r} does not exist; {expected}")
    raise ValueError(f"data source {path!r} is neither a folder nor a .npz file; {expected}")


def source_fingerprint(source):
    """16 hex digits naming a data source's content: "shapes" itself; an npz by its members' names, sizes and
    CRC-32s (from its zip directory: no image is read); a folder by its image files' paths and sizes."""
    digest = hashlib.sha256()
    if isinstance(source, str) and source == "shapes":
        digest.update(b"shapes")
    elif os.path.isdir(source):
        for path in list_images(source):
            digest.update(f"{os.path.relpath(path, source)}:{os.path.getsize(path)}\n".encode())
    else:
        with open_npz(source, "data npz (--data)", "write it again, or pass another --data") as f:
            members = sorted((i.filename, i.file_size, i.CRC) for i in f.zip.infolist())
        digest.update(repr(members).encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# The held-out split: the source's own test split, else a fixed fraction that training never sees
# ----------------------------------------------------------------------------------------------------

HELDOUT_FRACTION, HELDOUT_MAX, HELDOUT_SEED = 0.02, 5000, 20250605  # fixed: every stage holds out the same
NPZ_HELDOUT_SPLITS = ("test", "val")  # x_<split>/y_<split> keys a source may carry, in order of preference


class IndexSubset(Dataset):
    """Items `indices` of a dataset (int or (index, key) items, as split_item), with its class attributes."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, item):
        i, _ = split_item(item)
        return self.dataset[(self.indices[i], item[1]) if isinstance(item, (tuple, list)) else self.indices[i]]


def heldout_indices(n, fraction=HELDOUT_FRACTION, max_heldout=HELDOUT_MAX):
    """Sorted indices (int64) of range(n) held out: round(fraction * n) (at least 1, at most max_heldout)
    drawn by a permutation with a fixed seed, so every run and stage holds out the same images."""
    k = min(max(1, round(fraction * n)), max_heldout, n - 1)
    return np.sort(np.random.default_rng(HELDOUT_SEED).permutation(n)[:k])


def _own_heldout(source):
    """The source's own held-out split: ("npz", split), ("folder", path of .../val beside .../train),
    ("shapes", "val"), or None."""
    if isinstance(source, str) and source == "shapes":
        return "shapes", "val"
    path = os.fspath(source)
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        with open_npz(path, "data npz (--data)", "write it again, or pass another --data") as f:
            keys = set(f.files)
        found = [s for s in NPZ_HELDOUT_SPLITS if {f"x_{s}", f"y_{s}"} <= keys]
        return ("npz", found[0]) if found and "x_train" in keys else None
    sibling = os.path.join(os.path.dirname(os.path.normpath(path)), "val")
    if os.path.basename(os.path.normpath(path)) == "train" and os.path.isdir(sibling):
        return "folder", sibling
    return None


def heldout_split(source, image_size, seed=0, n_images=None, n_heldout=None, max_bad_fraction=0.01):
    """(training dataset, held-out dataset) of a source, never overlapping: the source's own held-out split
    (npz x_test/y_test or x_val/y_val; a folder .../train with a sibling .../val; the shapes' "val" split),
    else heldout_indices() of the source removed from training. n_images: training images kept (evenly
    spaced), n_heldout: held-out images kept; items as build_dataset."""
    own = _own_heldout(source)
    common = dict(image_size=image_size, seed=seed, max_bad_fraction=max_bad_fraction)
    if own is not None:
        kind, where = own
        train = build_dataset(source, n_images=n_images, **common)
        if kind == "folder":
            heldout = build_dataset(where, n_images=n_heldout, **common)
        else:
            n_kept = n_heldout or (HELDOUT_MAX if kind == "shapes" else None)
            heldout = build_dataset(source, split=where, n_images=n_kept, **common)
        return train, heldout
    full = build_dataset(source, **common)
    held = heldout_indices(len(full))
    rest = np.setdiff1d(np.arange(len(full)), held)
    return (IndexSubset(full, rest[_spaced_indices(len(rest), n_images)]),
            IndexSubset(full, held[_spaced_indices(len(held), n_heldout)]))


def heldout_images(dataset):
    """The held-out ADM centre crops as uint8 [N, 3, S, S] (small in memory) and their labels int64 [N]."""
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([(x * 255).round().to(torch.uint8) for x, _ in items])
    return images, torch.tensor([int(y) for _, y in items])


# ----------------------------------------------------------------------------------------------------
# Pre-tokenization with ten-crop (training recipe), one process or torchrun
# ----------------------------------------------------------------------------------------------------

PART_BATCHES = 100  # batches per resumable part of pre-tokenization (6,400 images at batch 64)


class PartFiles:
    """The resumable parts of a pre-tokenization into out_path, kept in <out_path>.parts until the whole file is
    written: rank{r}of{world}_batch{start}.npz holds the codes and labels of batches [start, stop) of rank r's
    share and the job it belongs to (what the codes are made from, the images, batch size and processes)."""

    def __init__(self, out_path, rank, world, job):
        self.folder, self.rank, self.world, self.job = f"{out_path}.parts", rank, world, job

    def paths(self, rank=None):
        """A rank's part files in batch order (default: this rank's); every rank's if rank is "all"."""
        names = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        prefix = "rank" if rank == "all" else f"rank{self.rank if rank is None else rank}of{self.world}_batch"
        return [os.path.join(self.folder, n) for n in names if n.startswith(prefix) and n.endswith(".npz")]

    def check(self):
        """ValueError if the folder holds parts of another job, which this one must not mix in or delete."""
        for path in self.paths("all"):
            theirs = job_of(path)
            if theirs != self.job:
                raise ValueError(f"{path} is a part of another pre-tokenization ({theirs}; this one: {self.job}): "
                                 f"run that one again to finish it, or delete {self.folder} to start over")

    def read(self, rank=None):
        """([codes int16 [n, 10, T]], [labels int64 [n]]) of a rank's parts in batch order, contiguous from batch 0,
        and the number of batches they hold."""
        codes, labels, done = [], [], 0
        for path in self.paths(rank):
            with open_npz(path, "pre-tokenization part", f"delete {self.folder} to start over") as f:
                if int(f["start"]) != done:
                    break
                codes.append(f["codes"])
                labels.append(f["labels"])
                done = int(f["stop"])
        return codes, labels, done

    def write(self, start, stop, codes, labels):
        """Batches [start, stop) of this rank's share as one part file (written atomically)."""
        save_npz(os.path.join(self.folder, f"rank{self.rank}of{self.world}_batch{start:07d}.npz"),
                 codes=np.concatenate(codes), labels=np.concatenate(labels), start=np.int64(start),
                 stop=np.int64(stop), job=self.job)


def _encode_share(tokenizer, share, parts, batch_size, device, progress, num_workers, seed, signals):
    """Encode the images of `share` with ten-crop, batches after those its parts already hold, into part files
    (PartFiles.write: every PART_BATCHES batches, at the end, and at a stop signal, which then raises Stopped)."""
    size, codebook_size = tokenizer.config.image_size, tokenizer.config.codebook_size
    _, _, done = parts.read()
    total = -(-len(share) // batch_size)
    loader = DataLoader(Subset(share, range(done * batch_size, len(share))), batch_size=batch_size,
                        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
                        generator=torch.Generator().manual_seed(seed))    # leaves the global RNG alone
    codes, labels, start = [], [], done
    for images, y in tqdm(loader, desc="pre-tokenizing", initial=done, total=total, disable=not progress):
        crops = ten_crop_tensor(images, size).to(device)  # [B, 10, 3, size, size]
        # One encoder batch per crop position keeps the encoder batch at batch_size.
        batch = torch.stack([tokenizer.encode(crops[:, k]) for k in range(10)], dim=1).cpu()  # [B, 10, T]
        assert 0 <= batch.min() and batch.max() < codebook_size, "encode() gave codes outside the codebook"
        codes.append(batch.to(torch.int16).numpy())
        labels.append(y.numpy().astype(np.int64))
        done += 1
        stop = signals is not None and signals.received
        if done - start == PART_BATCHES or done == total or stop:
            parts.write(start, done, codes, labels)
            codes, labels, start = [], [], done
        if stop:
            raise Stopped(signals.received, f"received {signals.name} while pre-tokenizing: {done} of {total} "
                                            f"batches of this process are kept in {parts.folder}; rerun the same "
                                            f"command to continue")


def _merge_shares(parts, n):
    """(codes [n, 10, T], labels [n]) in index order from every rank's parts; rank r held r, r + world, ..."""
    codes, labels = None, np.zeros(n, np.int64)
    for rank in range(parts.world):
        share_codes, share_labels, _ = parts.read(rank)
        if share_codes:  # a rank with no share has no parts
            share_codes = np.concatenate(share_codes)
            if codes is None:
                codes = np.zeros((n, 10, share_codes.shape[2]), np.int16)
            codes[rank::parts.world], labels[rank::parts.world] = share_codes, np.concatenate(share_labels)
    return (np.zeros((0, 10, 0), np.int16) if codes is None else codes), labels


@torch.no_grad()  # not inference_mode: tensors a module caches here must stay usable for training later
def pretokenize(tokenizer, source, out_path, batch_size=64, device="cpu", progress=True, num_workers=0, seed=0,
                made_from="", signals=None, tokenizer_fingerprint=None):
    """Encode every train image of `source` with ten-crop; write out_path (npz): codes int16 [N, 10, T] in
    TEN_CROP_ORDER, labels int64 [N], scalars n_tokens, codebook_size, image_size, num_classes and
    class_names, and the tokenizer's codebook fingerprint where given (checkpoints.codebook_fingerprint).
    source: as build_dataset, or a Dataset of [3, S, S] images (S >= size). The tokenizer must already be on
    `device`; it encodes in full float32. Under torch.distributed, rank r encodes indices r::world and rank 0
    writes the one file in index order. Resumable: the work is kept in part files (PartFiles, beside out_path,
    so on a filesystem all ranks see) for the job of `made_from` (what the codes are made from, in words), these
    images, batch size and processes; a rerun continues after the last part. With `signals`
    (plumbing.StopSignals), a stop signal keeps the batches done and raises plumbing.Stopped. seed: the
    DataLoader's own generator. Returns out_path."""
    size, codebook_size = tokenizer.config.image_size, tokenizer.config.codebook_size
    assert codebook_size <= 32768, f"codebook_size {codebook_size} does not fit int16 codes"
    data = source
    if isinstance(source, (str, os.PathLike)):
        data = build_dataset(source, int(size * TEN_CROP_SCALE))
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    job = "; ".join(filter(None, [made_from, f"{len(data)} images, batch {batch_size}, {world} process(es)"]))
    parts = PartFiles(out_path, rank, world, job)
    parts.check()
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with exact_float32():
            _encode_share(tokenizer, Subset(data, range(rank, len(data), world)), parts, batch_size, device,
                          progress and rank == 0, num_workers, seed, signals)
    finally:
        tokenizer.train(was_training)
    barrier()
    if rank == 0:
        codes, labels = _merge_shares(parts, len(data))
        save_npz(out_path, codes=codes, labels=labels, n_tokens=np.int64(codes.shape[2]),
                 codebook_size=np.int64(codebook_size), image_size=np.int64(size),
                 num_classes=np.int64(data.num_classes), class_names=np.array(data.class_names),
                 **({} if tokenizer_fingerprint is None else
                    {"tokenizer_fingerprint": np.array(tokenizer_fingerprint)}))
        if os.path.isdir(parts.folder):     # its parts, and what a kill during a write left of one
            for name in os.listdir(parts.folder):
                os.remove(os.path.join(parts.folder, name))
            os.rmdir(parts.folder)
    barrier()  # every rank returns only once the file exists
    return out_path


# ----------------------------------------------------------------------------------------------------
# Pre-tokenized codes for the generator
# ----------------------------------------------------------------------------------------------------

class CodesDataset(Dataset):
    """Pre-tokenized npz: items (codes int64 [T], label int). An (index, key) item draws one of the image's 10
    crops from its key (split_item): each visit of an image takes one at random. An int item gives the
    centre crop."""

    def __init__(self, path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; expected the .npz written by pretokenize()")
        with open_npz(path, "codes file (--codes)", "delete it to pre-tokenize again, or pass another --codes") as f:
            missing = [k for k in ("codes", "labels") + CODES_META if k not in f.files]
            if missing:
                raise ValueError(f"{path}: missing {missing}; expected codes, labels, "
                                 f"{', '.join(CODES_META)} as written by pretokenize()")
            self.codes, self.labels = f["codes"], f["labels"]
            meta = {k: int(f[k]) for k in CODES_META}
            names = _string_array(f, "class_names")
            self.tokenizer_fingerprint = str(f["tokenizer_fingerprint"]) if "tokenizer_fingerprint" in f.files else None
        self.n_tokens, self.codebook_size = meta["n_tokens"], meta["codebook_size"]
        self.image_size, self.num_classes = meta["image_size"], meta["num_classes"]
        self.class_names = names or [str(c) for c in range(self.num_classes)]
        self._check(path)
        if self.class_names == [str(c) for c in range(self.num_classes)]:     # numbers, not names
            check_label_bulk(self.labels, self.num_classes, f"{path} (labels without class names)",
                             "fix the labels of the source it was made from (or store the class names as "
                             "`classes` in that npz) and pre-tokenize again: delete this file")

    def _check(self, path):
        codes, labels, n = self.codes, self.labels, len(self.codes)
        problems = [
            (codes.dtype == np.int16, f"codes dtype {codes.dtype}, expected int16"),
            (codes.ndim == 3 and codes.shape[1:] == (10, self.n_tokens),
             f"codes shape {codes.shape}, expected [N, 10, n_tokens={self.n_tokens}]"),
            (labels.dtype == np.int64 and labels.shape == (n,), f"labels {labels.dtype} {labels.shape}, "
                                                                f"expected int64 [{n}] (one per image)"),
            (n > 0, "no images"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(f"{path}: {message}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"{path}: codes outside [0, codebook_size={self.codebook_size})")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"{path}: labels outside [0, num_classes={self.num_classes})")

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, item):
        i, rng = split_item(item)
        k = TEN_CROP_ORDER.index("centre") if rng is None else int(rng.integers(10))
        return torch.from_numpy(self.codes[i, k].astype(np.int64)), int(self.labels[i])
