"""A run's plumbing, shared by train.py, sample.py, fid.py and the tools: files written atomically, torchrun
processes, the run-folder lock, stop signals, one-line errors, and pictures (image grids, metric curves).

Nothing here is the paper's method; it is what keeps a long run from losing work or failing silently.
"""
import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import signal
import socket
import sys
from typing import NamedTuple
import zipfile
import zlib

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------
# Files: read with one line naming a damaged file, written atomically, never over another job's file
# ----------------------------------------------------------------------------------------------------

NPZ_ERRORS = (zipfile.BadZipFile, EOFError, zlib.error)  # what a damaged npz raises while it is read


@contextlib.contextmanager
def open_npz(path, what="npz", fix="write it again"):
    """np.load(path) without pickle, as a context; a missing, empty, truncated or damaged file, one that is not an
    npz, and an object array read inside the context end as one FileNotFoundError or ValueError naming `what`
    and the file, and saying `fix`."""
    name, prefix = os.fspath(path), f"{what} " if what else ""
    if not os.path.isfile(name):
        raise FileNotFoundError(f"{prefix}not found: {name!r}")
    if not zipfile.is_zipfile(name):        # np.load would try to unpickle it and say only that pickles are refused
        found = "empty (0 bytes)" if os.path.getsize(name) == 0 else "no zip directory at its end: truncated, or no npz"
        raise ValueError(f"{prefix}{name}: not a readable .npz ({found}): {fix}")
    try:
        with np.load(name, allow_pickle=False) as f:
            yield f
    except NPZ_ERRORS as error:
        raise ValueError(f"{prefix}{name}: not a readable .npz (truncated or corrupt? {type(error).__name__}: "
                         f"{str(error)[:160]}): {fix}") from error
    except ValueError as error:
        if "allow_pickle" not in str(error):
            raise
        raise ValueError(f"{prefix}{name}: holds an object array (pickled Python objects, which are not read): "
                         f"store numbers or strings, e.g. np.asarray(labels, np.int64)") from None


def read_json(path, what="JSON file", fix="write it again"):
    """json.load(path); a missing, empty or damaged file ends as one FileNotFoundError or ValueError naming `what`
    and the file, and saying `fix`."""
    name = os.fspath(path)
    try:
        with open(name) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {name!r}") from None
    except (ValueError, UnicodeDecodeError) as error:      # JSONDecodeError is a ValueError
        raise ValueError(f"{what} {name!r} is not readable JSON ({str(error)[:120]}): {fix}") from None


def job_of(path):
    """The job record (a dict: the writing program and the settings that decide the file) that this project's
    writers put in a JSON ("job" key), npz ("job" entry) or picture (PNG text, JPEG comment); None if none."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            with open(path) as f:
                obj = json.load(f)
            return obj.get("job") if isinstance(obj, dict) else None
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                return json.loads(str(f["job"])) if "job" in f.files else None
        if ext in PICTURE_FORMATS:
            with Image.open(path) as image:
                text = image.info.get("job") or image.info.get("comment")
            return json.loads(text) if text else None
    except Exception:       # damaged, or no file of this project: no job record
        return None
    return None


def claim(path, job, flag, overwrite=False):
    """Before writing `path`: FileExistsError when it exists and is not a file made by the same `job` (a JSON-ready
    dict), unless `overwrite`; the message says what is there and what to pass."""
    if overwrite or not os.path.exists(path):
        return
    job, theirs = json.loads(json.dumps(job)), job_of(path)
    if theirs == job:
        return
    if isinstance(theirs, dict) and theirs.get("program") == job.get("program"):
        differ = sorted(k for k in set(job) | set(theirs) if job.get(k) != theirs.get(k))
        what = f"the output of another {job['program']} job (it differs in {', '.join(differ)})"
    elif isinstance(theirs, dict):
        what = f"the output of {theirs.get('program')}"
    else:
        what = "a file this program did not make"
    raise FileExistsError(f"{flag} {path} already holds {what}: choose another {flag}, or pass --overwrite to "
                          f"replace it")


def remove_stale_temporaries(folder, names=None):
    """Remove the temporary files (<name>.tmp<pid>, of atomic_write) that a killed writer left in `folder` (only
    those of `names`, where given); the caller holds the folder or file, so no live writer owns them."""
    if not os.path.isdir(folder):
        return
    for entry in os.scandir(folder):
        stem, tmp, pid = entry.name.rpartition(".tmp")
        if tmp and pid.isdigit() and entry.is_file() and (names is None or stem in names):
            os.remove(entry.path)


def atomic_write(path, write, mode="wb"):
    """Call write(file) on a temporary file beside `path`, then rename it: readers see the old file or the
    whole new one, never half of one. A kill leaves `path` as it was; a full filesystem too, and raises an
    OSError that says so, names the file and says that its previous version is intact. Any other OSError is
    one naming `path` (not the temporary file)."""
    tmp, existed = f"{path}.tmp{os.getpid()}", os.path.exists(path)
    try:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(tmp, mode) as f:
                write(f)
            os.replace(tmp, path)
        except (OSError, RuntimeError) as error:
            why = full_filesystem(error, tmp)       # asked while the temporary file still takes its space
            if why is None and not isinstance(error, OSError):
                raise                               # a writer's own failure, not the file's
            if why is None:
                failed = OSError(f"cannot write {path}: {error.strerror or error}")
                failed.errno = error.errno
                raise failed from error
            kept = f"the previous {path} is intact" if existed else f"nothing was written to {path}"
            full = OSError(f"cannot write {path}: the filesystem is full ({why}); {kept}. Free some space "
                           f"on it (or write elsewhere) and run again")
            full.errno = getattr(error, "errno", None) or errno.ENOSPC     # no .filename: str() would drop the words
            raise full from error
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left on the device; the user's disk quota is used up


def full_filesystem(error, path):
    """Why a failed write of `path` means its filesystem is full (the OS error's words), else None. Writers
    that wrap the OS error (torch.save raises RuntimeError "unexpected pos ...") are judged by the space
    left: under one block free to this user is full."""
    if isinstance(error, OSError):
        return os.strerror(error.errno) if error.errno in FULL_ERRNOS else None
    try:
        fs = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return None
    free = (fs.f_bfree if os.geteuid() == 0 else fs.f_bavail) * fs.f_frsize   # root may use reserved blocks
    if free >= fs.f_bsize:
        return None
    return f"{free} bytes left after the writer stopped: {str(error).splitlines()[0][:160]}"


def save_checkpoint(obj, path):
    """torch.save(obj) to path atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path, job=None, **arrays):
    """An uncompressed npz written atomically (a file object stops numpy appending ".npz" to the name), with the
    `job` that made it (claim) as a "job" string entry where given."""
    extra = {} if job is None else {"job": np.array(json.dumps(job))}
    atomic_write(path, lambda f: np.savez(f, **arrays, **extra))


def save_json(path, obj, job=None):
    """JSON (indented) written atomically, with the `job` that made it (claim) as its "job" key where given."""
    obj = obj if job is None else {"job": job, **obj}
    atomic_write(path, lambda f: json.dump(obj, f, indent=2), mode="w")


def is_distributed():
    """True under an initialised torch.distributed process group (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def barrier():
    """dist.barrier() under torchrun, else nothing."""
    if is_distributed():
        dist.barrier()


DIST_TIMEOUT_ENV = "ALITOK_DIST_TIMEOUT_MIN"   # minutes a collective may wait for the slowest rank


def dist_timeout():
    """How long a collective waits before failing: $ALITOK_DIST_TIMEOUT_MIN minutes, default 60. Rank-0 work
    between two collectives (merging ImageNet's ten-crop codes, held-out rFID, a checkpoint on a slow disk)
    takes minutes, past NCCL's 10-minute default."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "60")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise ValueError(f"${DIST_TIMEOUT_ENV}={raw!r}: expected a positive number of minutes (default 60)")
    return datetime.timedelta(minutes=minutes)


class Process(NamedTuple):
    """This process under torchrun (or alone): its rank, the number of processes, its torch device."""
    rank: int
    world: int
    device: torch.device


def setup_distributed(device=None):
    """This Process: init torch.distributed under torchrun (nccl on GPU, gloo on CPU), with dist_timeout() and,
    on CUDA, this process's device bound to the group.
    device: a torch device string; default cuda (this process's LOCAL_RANK) if available, else cpu."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not is_distributed():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=dist_timeout(),
                                **({"device_id": device} if use_cuda else {}))
    return Process(rank=dist.get_rank() if world > 1 else 0, world=world, device=device)


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convolutions in full float32 inside (no TF32, which training turns on for CUDA), the
    settings restored after: for frozen networks whose outputs are codes, loss targets or FID features (TF32 rounds
    products' inputs to 10-bit mantissas on Ampere and later; that moves FID at the 1e-2 level)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(device, precision):
    """Autocast to bfloat16 on `device` (cpu or cuda) for precision "bf16", a no-op for "fp32"."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def to_uint8(images, rounding="round"):
    """float [B, 3, H, W] in [0, 1] -> uint8 numpy [B, H, W, 3]. rounding "round" (pictures) or "truncate"
    (the original code's evaluation batches: (x.clamp(0, 1) * 255).to(uint8))."""
    x = images.detach().float().clamp(0, 1).mul(255)
    x = x.round() if rounding == "round" else x
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class RunFolderLock:
    """Hold a run folder (or, given `path`, one output file) for this process: a second live run on it is
    refused with the holder's pid and host. The lock is an flock on <folder>/.lock (or `path`), which the kernel
    drops when its process dies, so a killed run leaves nothing that blocks its own --resume; the lock file is
    removed when the holder leaves, and a killed holder's is taken over and removed by the next one."""

    def __init__(self, folder, path=None, flag="--out"):
        self.folder, self.flag, self.file = folder, flag, None
        self.path = path or os.path.join(folder, ".lock")

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            self.file = open(self.path, "a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.file.seek(0)
                holder = self.file.read().strip() or "another process"
                self.file.close()
                raise ValueError(f"{self.folder} is in use by a live run ({holder}): wait for it to finish or "
                                 f"stop it, or choose another {self.flag}") from None
            try:        # the lock of a file its holder removed meanwhile holds nothing: take the new file's
                if os.path.samestat(os.fstat(self.file.fileno()), os.stat(self.path)):
                    break
            except FileNotFoundError:
                pass
            self.file.close()
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)                    # before the unlock: a waiting process then takes a new file
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class StopSignals:
    """Turn SIGTERM (what a cluster scheduler sends before preempting a job) and SIGINT (Ctrl-C) into a
    request that the training loop honours between steps; a second signal of a kind stops at once."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self.received, self._old = signals, None, {}

    def _handle(self, signum, frame):
        if self.received == signum:                         # asked twice: the user means it
            signal.signal(signum, self._old[signum])
            signal.raise_signal(signum)
        self.received = signum

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    @property
    def name(self):
        """The received signal's name (e.g. "SIGTERM"), or None."""
        return None if self.received is None else signal.Signals(self.received).name


class Stopped(Exception):
    """Long work outside the training loop (pre-tokenization) stopped by a signal after keeping what it did: the
    signal's number and one line saying how to continue. cli() prints the line and exits 128 + the number."""

    def __init__(self, signum, message):
        super().__init__(message)
        self.signum = signum


def cli(main, *args):
    """Run an entry point's main(*args): errors of bad input (missing or unreadable files, wrong layouts,
    out-of-range values) end as one "error: ..." line and exit status 2, not a traceback; a Stopped as its line
    and 128 + the signal number."""
    try:
        return main(*args)
    except Stopped as stop:
        print(stop, file=sys.stderr)
        return 128 + stop.signum
    except (OSError, ValueError, FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _whole(x):
    return isinstance(x, int) and not isinstance(x, bool) or isinstance(x, float) and x.is_integer()


# The kinds of numeric flags: kind -> (test of a value, the range in words)
FLAG_KINDS = {
    "count": (lambda x: _whole(x) and x >= 1, "a whole number >= 1"),
    "index": (lambda x: _whole(x) and x >= 0, "a whole number >= 0"),
    "seed": (lambda x: _whole(x) and 0 <= x < 2 ** 32, "a whole number in [0, 4294967295]"),   # x 1000003 fits int64
    "positive": (lambda x: math.isfinite(x) and x > 0, "a finite number > 0"),
    "nonnegative": (lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0"),
    "finite": (math.isfinite, "a finite number"),
    "fraction": (lambda x: 0 < x <= 1, "a number in (0, 1]"),       # comparisons with nan are False
    "probability": (lambda x: 0 <= x <= 1, "a number in [0, 1]"),
}


def check_flags(args, rules):
    """Raise ValueError("--flag value: expected <range>") at the first flag out of its range. rules: {"--flag":
    kind} with kinds from FLAG_KINDS; values are read from the argparse Namespace `args` (dashes as
    underscores); unset (None) passes; a list (nargs) is checked item by item."""
    for flag, kind in rules.items():
        ok, words = FLAG_KINDS[kind]
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        for x in value if isinstance(value, (list, tuple)) else [value]:
            if x is not None and not ok(x):
                raise ValueError(f"{flag} {x}: expected {words}")


def make_run_folder(out):
    """Create the run folder, or an OSError saying that it cannot be written and what to do."""
    probe = os.path.join(out, f".writable{os.getpid()}")     # one per process: torchrun's ranks probe at once
    try:
        os.makedirs(out, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as error:
        raise OSError(f"cannot write the run folder --out {out} ({error.strerror or error}): choose a folder "
                      f"you can write to") from error


class Logger:
    """Rank-0 JSON-lines metrics and messages."""

    def __init__(self, out, rank):
        self.rank, self.path = rank, os.path.join(out, "metrics.jsonl")
        self.last_good = "no checkpoint was written before"     # the training loop updates it at each save

    def info(self, msg):
        """Print a message line (rank 0), above the progress bar."""
        if self.rank == 0:
            tqdm.write(msg)

    def metrics(self, record):
        """Append a JSON-ready dict as one line of <out>/metrics.jsonl (rank 0); a failed write (a full disk) is an
        OSError naming the file and the last good checkpoint."""
        if self.rank == 0:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as error:
                raise OSError(f"cannot append to {self.path} ({error.strerror or error}); {self.last_good}. Free "
                              f"some space (or fix the folder) and continue with --resume") from None


def agreed_signal(signals, group):
    """The stop signal any process has received (0: none), agreed by all through a host-side (gloo) all_reduce,
    so that every process stops after the same step without a device sync."""
    if group is None:
        return signals.received or 0
    flag = torch.tensor([signals.received or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag)


# ----------------------------------------------------------------------------------------------------
# Pictures: image grids and metric curves
# ----------------------------------------------------------------------------------------------------

PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # picture file name ending -> PIL format


def save_grid(images, path, nrow=8, padding=2, min_side=128, job=None):
    """Save float [B, 3, H, W] in [0, 1] as a grid in the format its name asks for (PICTURE_FORMATS): nrow images
    per row, `padding` black px around each; images smaller than min_side px are enlarged by a whole factor
    (nearest neighbour) so a person can see them. `job` (claim) goes in as PNG text or a JPEG comment."""
    kind = PICTURE_FORMATS.get(os.path.splitext(path)[1].lower())
    if kind is None:
        raise ValueError(f"{path}: a picture is written as {' or '.join(PICTURE_FORMATS)}; name it so")
    x = to_uint8(images)
    zoom = max(1, -(-min_side // min(x.shape[1:3])))
    x = x.repeat(zoom, axis=1).repeat(zoom, axis=2)
    b, h, w, _ = x.shape
    rows, cols = -(-b // nrow), min(nrow, b)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), np.uint8)
    for i in range(b):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = x[i]
    options = {"quality": 95} if kind == "JPEG" else {}
    if job is not None and kind == "PNG":
        options["pnginfo"] = PngInfo()
        options["pnginfo"].add_text("job", json.dumps(job))
    elif job is not None:
        options["comment"] = json.dumps(job)
    atomic_write(path, lambda f: Image.fromarray(grid).save(f, format=kind, **options))


def font(size):
    """PIL's default font at `size` px where this Pillow scales it (10.1+), else its fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def save_curves(path, records, keys, panel=(360, 220), margin=44):
    """A PNG of metric curves: one panel per key of `keys` found in the records (dicts with "step"), the value
    against the step as a line, with its first, last, lowest and highest values written beside it."""
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if len(v) >= 2}
    if not series:
        return
    cols = min(3, len(series))
    image = Image.new("RGB", (panel[0] * cols, panel[1] * -(-len(series) // cols)), "white")
    draw, small = ImageDraw.Draw(image), font(12)
    for i, (key, points) in enumerate(series.items()):
        x0, y0 = (i % cols) * panel[0] + margin, (i // cols) * panel[1] + 24
        w, h = panel[0] - margin - 12, panel[1] - 24 - 30
        steps, values = zip(*points)
        lo, hi = min(values), max(values)
        scale = lambda v: y0 + h - (v - lo) / ((hi - lo) or 1.0) * h
        xs = lambda s: x0 + (s - steps[0]) / ((steps[-1] - steps[0]) or 1) * w
        draw.rectangle((x0, y0, x0 + w, y0 + h), outline=(180, 180, 180))
        draw.line([(xs(s), scale(v)) for s, v in points], fill=(0, 114, 178), width=2)
        draw.text((x0, y0 - 18), f"{key}: {values[0]:.4g} -> {values[-1]:.4g}", fill="black", font=small)
        draw.text((x0 - margin + 2, y0), f"{hi:.3g}", fill="black", font=small)
        draw.text((x0 - margin + 2, y0 + h - 12), f"{lo:.3g}", fill="black", font=small)
        draw.text((x0, y0 + h + 4), f"step {steps[0]}", fill="black", font=small)
        draw.text((x0 + w - 70, y0 + h + 4), f"step {steps[-1]}", fill="black", font=small)
    atomic_write(path, lambda f: image.save(f, format="PNG"))


CURVES = ("loss", "psnr", "acc", "heldout_psnr", "heldout_rfid", "heldout_loss", "heldout_acc", "lr")


@torch.no_grad()
def save_pictures(images, nrow, out, step):
    """A training run's picture grid (float [N, 3, H, W] in [0, 1], `nrow` a row) as <out>/pictures_<step>.png
    and <out>/latest.png, and its curves so far as <out>/metrics.png."""
    for name in (f"pictures_{step:07d}.png", "latest.png"):
        save_grid(images, os.path.join(out, name), nrow=nrow)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):      # the curves so far
        with open(os.path.join(out, "metrics.jsonl")) as f:
            save_curves(os.path.join(out, "metrics.png"), [json.loads(line) for line in f], CURVES)
