"""The standard weight files (FID Inception, ConvNeXt-S, VGG16, LPIPS heads): fetched on first use from the
URLs their own libraries use, verified by SHA-256 and cached in the torch hub cache, as pytorch-fid and
torchvision do. An explicit path always wins; --offline or $ALITOK_OFFLINE=1 forbids downloads. The released
AliTok files are not here: they are paths the user passes.
"""
import contextlib
import fcntl
import hashlib
import http.client
import os
import re
import sys
import urllib.error
from typing import NamedTuple

import torch



class WeightFile(NamedTuple):
    url: str      # where its makers serve it: the URL their own code (pytorch-fid, torchvision, LPIPS) uses
    sha256: str   # its SHA-256, or the leading hex digits of it that torchvision-style names carry
    use: str      # what needs it (for messages)
    without: str  # what still works without it (for the offline message)


INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
CONVNEXT_WEIGHTS = "convnext_small-0c510722.pth"
VGG16_WEIGHTS = "vgg16-397923af.pth"
# lpips/weights/v0.1/vgg.pth of the LPIPS repository (and pip package), cached under a name of its own:
# "vgg.pth" is too generic for a folder that torch.hub shares with other tools.
LPIPS_WEIGHTS = "lpips_v0.1_vgg-a78928a0.pth"
_TORCHVISION = "https://download.pytorch.org/models/"
_TRAINING = "sampling, scoring and training with that loss switched off work without it"
STANDARD_WEIGHTS = {  # file name in the cache -> WeightFile (tests point the URLs at a local server)
    INCEPTION_WEIGHTS: WeightFile(
        "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION_WEIGHTS,
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",  # torch-fidelity's copy is the same
        "FID, IS, sFID, Precision/Recall and rFID (the ADM evaluator's Inception)",
        "training, sampling and every number but these scores work without it"),
    CONVNEXT_WEIGHTS: WeightFile(_TORCHVISION + CONVNEXT_WEIGHTS, "0c510722",
                                 "the tokenizer's ConvNeXt-S perceptual loss", _TRAINING),
    VGG16_WEIGHTS: WeightFile(_TORCHVISION + VGG16_WEIGHTS, "397923af", "the tokenizer's LPIPS loss (VGG16)",
                              _TRAINING),
    LPIPS_WEIGHTS: WeightFile(
        "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
        "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
        "the tokenizer's LPIPS loss (v0.1 linear heads)", _TRAINING),
}
OFFLINE_ENV = "ALITOK_OFFLINE"  # set to 1 to forbid every download (as --offline does)


def weights_cache():
    """The folder of cached standard weight files: torch.hub.get_dir()/checkpoints ($TORCH_HOME/hub/checkpoints),
    shared with torchvision and pytorch-fid, so files they fetched are used as they are."""
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def offline_mode():
    """True when $ALITOK_OFFLINE is set to anything but "" or "0"."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def file_sha256(path):
    """SHA-256 (hex) of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _place_by_hand(name, entry, dest):
    return (f"Download {entry.url} and put it at {dest} (the folder follows $TORCH_HOME), or pass its path "
            f"explicitly; {entry.without}.")


def _download(name, entry, dest, progress):
    """Fetch entry.url to dest with torch.hub.download_url_to_file: a temporary file beside dest, a progress
    bar, the SHA-256 prefix checked before the file is moved into place (a failure leaves no file)."""
    print(f"downloading {name} ({entry.use}) from {entry.url} to {dest}", file=sys.stderr)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    try:
        torch.hub.download_url_to_file(entry.url, dest, hash_prefix=entry.sha256, progress=progress)
    except RuntimeError as error:          # torch.hub's words for a hash mismatch: 'invalid hash value ...'
        got = re.search(r'got "([0-9a-f]+)"', str(error))
        if got is None:
            raise
        raise ValueError(f"the download of {name} from {entry.url} has SHA-256 {got.group(1)}, expected "
                         f"{entry.sha256}...: a damaged or changed file, deleted (nothing was cached). "
                         + _place_by_hand(name, entry, dest)) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        reason = getattr(error, "reason", None) or error
        raise OSError(f"could not download {name} from {entry.url} ({reason}). "
                      + _place_by_hand(name, entry, dest)) from error


def standard_weights(name, path=None, offline=False, progress=True):
    """Path of standard weight file `name` (a STANDARD_WEIGHTS key): `path` if given (it must exist); else
    its copy in weights_cache() once its SHA-256 checks; else downloaded there first (progress bar), unless
    `offline` or $ALITOK_OFFLINE. Callers load it with weights_only=True (checkpoints.read_checkpoint). It calls no
    collective: under torchrun any subset of ranks may call it, and the first to come fetches the file."""
    entry = STANDARD_WEIGHTS[name]
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.fspath(path)!r} given for {name} ({entry.use}) is not a file; give its "
                                    f"right path, or none to use the cached standard file (fetched on first use)")
        return os.fspath(path)
    with _fetch_lock(weights_cache()):
        return _cached_or_downloaded(name, entry, offline, progress)


@contextlib.contextmanager
def _fetch_lock(folder):
    """One process at a time looks up and fetches into the cache `folder`: the others wait on an flock of the
    folder itself (no lock file left behind), then find the cached copy. No collective: any process may call
    standard_weights alone (rank 0's rFID network does), and separate jobs sharing one cache are kept apart too."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                     # a read-only cache: nothing will be written there, so nothing to guard
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                    # closing drops the lock


def _cached_or_downloaded(name, entry, offline, progress):
    """standard_weights' cache lookup (hash-checked) and download."""
    dest = os.path.join(weights_cache(), name)
    if os.path.isfile(dest):
        found = file_sha256(dest)
        if not found.startswith(entry.sha256):  # not ours (we rename only verified files): leave it to its owner
            raise ValueError(f"{dest} has SHA-256 {found}, expected {entry.sha256}...: not the standard {name}. "
                             f"Delete it to have it downloaded again, or pass the right file's path explicitly")
        return dest
    if offline or offline_mode():
        raise FileNotFoundError(f"{name} is needed for {entry.use} and is not in the cache, and offline mode "
                                f"(--offline or {OFFLINE_ENV}=1) forbids downloading it. "
                                + _place_by_hand(name, entry, dest))
    _download(name, entry, dest, progress)
    return dest
