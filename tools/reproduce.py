"""Reproduce a row of AliTok's table from the released files, with a manifest of what decides the number.

The paper's protocol (reference/ALITOK_SPEC.md "Sampling", reference/EVALUATOR_SPEC.md), which this tool runs:
  samples   50,000 = 50 per class of the 1,000 ImageNet classes (shuffled), from the released generator
            (alitok_b.bin, alitok_l.bin, alitok_xl.bin) and tokenizer (AliTok.pth); temperature 1, no top-k or
            top-p, the released guidance scale g and power p (B 16 / 1.8, L 6 / 0.7, XL 13 / 1.4), float32
            (TF32 allowed on a GPU), pixels to uint8 by truncation. Written by sample.py's npz path: resumable
            (rerun the same line), under torchrun with any number of processes.
  scores    fid.py, OpenAI's ADM evaluator in PyTorch (mode adm, float32 Inception
            pt_inception-2015-12-05-6726825d.pth), against the reference batch VIRTUAL_imagenet256_labeled.npz:
            FID and sFID from its stored statistics, Precision / Recall against its 10,000 images.
  paper     FID / IS: B 1.50 / 305.9, L 1.42 / 326.6, XL 1.35 / 318.8 (arXiv 2506.05289 v1; the spec gives
            no sFID, Precision or Recall).
  --tokenizer-only: ImageNet val (50,000 images, ADM centre crop to 256 px; a folder or an npz) reconstructed
            through the tokenizer's stage-2 decoder (AliTok.pth), and through a stage-1 checkpoint's causal
            decoder with --stage1: rFID (reconstructions against the originals; not comparable to a gFID), PSNR,
            codebook usage. Paper: rFID 0.86 (the spec gives no PSNR or usage).
A run that departs from any of these (fewer samples or classes, other guidance, bf16, a reference batch of
another layout, other Inception weights, no --model) prints "FID-<N>, not comparable to the paper" with the
reasons and no paper number beside it. <out>/reproduce.json records what decides the numbers: SHA-256 of every
input file, every sampling setting and the seeds, the sample count and class balance, precision and TF32, world
size, torch and CUDA versions, the evaluator's mode and the reference batch's SHA-256. The released files do not
come with this code; the Inception file is fetched on first use (--offline forbids it).

examples:
  make reproduce MODEL=B GENERATOR=alitok_b.bin TOKENIZER=AliTok.pth REF=VIRTUAL_imagenet256_labeled.npz
  torchrun --nproc_per_node=8 tools/reproduce.py --model B --generator alitok_b.bin --tokenizer AliTok.pth \\
      --ref VIRTUAL_imagenet256_labeled.npz --out runs/reproduce_B
  python tools/reproduce.py --tokenizer-only --tokenizer AliTok.pth --images imagenet/val --out runs/rfid
  # a quick look (labelled FID-6, not comparable): 2 samples of each of 3 classes
  python tools/reproduce.py --generator runs/ar/generator.pt --ref ref.npz --per-class 2 --num-classes 3
"""
import argparse
import hashlib
import json
import os
import platform
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import numpy as np
import torch

import checkpoints
import fid
import inception
import plumbing
import sample
import weights
from alitok import GENERATOR_PRESETS

PAPER = {"B": {"fid": 1.50, "inception_score": 305.9},     # arXiv 2506.05289 v1, as ALITOK_SPEC.md quotes it
         "L": {"fid": 1.42, "inception_score": 326.6},
         "XL": {"fid": 1.35, "inception_score": 318.8}}
PAPER_TOKENIZER = {"rfid": 0.86}
PER_CLASS, NUM_CLASSES, IMAGE_SIZE = 50, 1000, 256       # the paper's evaluation batch: 50,000 256 px samples
REF_IMAGES, VAL_IMAGES = 10_000, 50_000                  # the ADM reference batch's images; ImageNet val
ROWS = (("FID", "fid"), ("IS", "inception_score"), ("sFID", "sfid"), ("Precision", "precision"),
        ("Recall", "recall"))
TOKENIZER_ROWS = (("rFID", "rfid"), ("PSNR (dB)", "psnr"), ("codebook usage", "codebook_usage"))
SEEDS = ("sample i uses seed * 1000003 + i (sample.py); the paper's run seeded each process (42 + rank for B and "
         "L, 2 + rank for XL): the same distribution, other images")
FLAG_RULES = {"--per-class": "count", "--num-classes": "count", "--seed": "index", "--batch-size": "count",
              "--cfg-scale": "finite", "--cfg-power": "nonnegative"}


# --- What decides a number: files, environment, and the protocol's checks ---------------------------

def fingerprint(path):
    """{"path", "sha256"} of a file; of a folder, "listing_sha256" over its files' relative paths and sizes."""
    path = os.path.abspath(path)
    if os.path.isfile(path):
        return {"path": path, "sha256": weights.file_sha256(path)}
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(f"{os.path.relpath(full, path)}\t{os.path.getsize(full)}\n".encode())
    return {"path": path, "listing_sha256": digest.hexdigest()}


def environment():
    """torch, CUDA and cuDNN versions, the GPU, Python: what the numbers were computed with."""
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "gpu": torch.cuda.get_device_name() if cuda else None, "python": platform.python_version()}


def inception_facts(path):
    """The Inception file's fingerprint and whether it is the standard pt_inception-2015-12-05 file."""
    facts = fingerprint(path)
    facts["standard"] = facts["sha256"] == weights.STANDARD_WEIGHTS[weights.INCEPTION_WEIGHTS].sha256
    return facts


def protocol_gaps(m):
    """Why a generator run's manifest `m` is not the paper's protocol, one phrase each; [] when it is."""
    s, ref, model, gaps = m["sampling"], m["reference"], m["model"], []
    if model is None:
        gaps.append("no --model: no row of the paper is named")
    elif m["generator"]["preset"] != model:
        size = m["generator"]["preset"] or "none of B, L, XL"
        gaps.append(f"the generator is not AliTok-{model}'s size (its size: {size})")
    counts = s["class_counts"]
    if s["n"] != PER_CLASS * NUM_CLASSES or len(counts) != NUM_CLASSES or set(counts) != {PER_CLASS}:
        gaps.append(f"{s['n']:,} samples, {min(counts)} to {max(counts)} per class over {len(counts)} classes "
                    f"(the paper: 50 of each of 1,000)")
    if model in GENERATOR_PRESETS and (s["cfg_scale"], s["cfg_power"]) != (GENERATOR_PRESETS[model].cfg_scale,
                                                                          GENERATOR_PRESETS[model].cfg_power):
        g = GENERATOR_PRESETS[model]
        gaps.append(f"guidance {s['cfg_scale']} / {s['cfg_power']} (released: {g.cfg_scale} / {g.cfg_power})")
    if (s["temperature"], s["top_k"], s["top_p"]) != (1.0, 0, 1.0):
        gaps.append(f"temperature {s['temperature']}, top-k {s['top_k']}, top-p {s['top_p']} (released: 1, off, off)")
    if s["precision"] != "fp32":
        gaps.append(f"sampled in {s['precision']} (the paper: float32)")
    if (ref["images"], ref["image_size"], ref["stored_statistics"]) != (REF_IMAGES, [IMAGE_SIZE] * 2, True):
        gaps.append(f"the reference batch holds {ref['images']} images of {ref['image_size']} px"
                    f"{'' if ref['stored_statistics'] else ' and no stored statistics'} (VIRTUAL_imagenet256_labeled"
                    f".npz: 10,000 of 256 px, mu / sigma of the whole set)")
    return gaps + inception_gaps(m["evaluator"]["inception"])


def inception_gaps(facts):
    """[] for the standard Inception file, else why not."""
    return [] if facts["standard"] else [f"the Inception weights are not {weights.INCEPTION_WEIGHTS} (a stand-in)"]


def tokenizer_gaps(m):
    """Why a --tokenizer-only manifest `m` is not the paper's rFID protocol, one phrase each; [] when it is."""
    gaps = [] if m["images"]["count"] == VAL_IMAGES else [f"{m['images']['count']:,} images (the paper: the "
                                                          f"50,000 of ImageNet val)"]
    if m["images"]["image_size"] != IMAGE_SIZE:
        gaps.append(f"{m['images']['image_size']} px reconstructions (the paper: 256)")
    return gaps + inception_gaps(m["evaluator"]["inception"])


def label(metric, n, gaps):
    """The name a number is shown under: the metric when the run is the paper's protocol, else "<metric>-<N>,
    not comparable to the paper"."""
    return metric if not gaps else f"{metric}-{n}, not comparable to the paper"


def table(title, rows, ours, paper, n, gaps):
    """The printed result: our numbers, and the paper's beside them only when `gaps` is empty."""
    shown = lambda key, x: "n/a" if x is None else f"{x:.3f}" if key in ("precision", "recall", "codebook_usage") \
        else f"{x:.2f}"
    lines = [f"{title}: {label(rows[0][0], n, gaps)}"]
    if gaps:
        lines.append("  not the paper's protocol: " + "; ".join(gaps))
    lines.append(f"  {'':16}{'ours':>10}" + ("" if gaps else f"{'paper':>10}"))
    for name, key in rows:
        lines.append(f"  {name:16}{shown(key, ours[key]):>10}" + ("" if gaps else f"{shown(key, paper.get(key)):>10}"))
    return "\n".join(lines)


# --- Generation: the evaluation batch through sample.py, scored by fid.py ----------------------------

def sample_argv(args, out):
    """sample.py's command line for this run's batch: all --num-classes classes, --per-class each."""
    released = GENERATOR_PRESETS.get(args.model)
    scale = args.cfg_scale if args.cfg_scale is not None else released and released.cfg_scale
    power = args.cfg_power if args.cfg_power is not None else released and released.cfg_power
    argv = ["--ckpt", args.generator, "--npz", str(args.per_class * args.num_classes), "--out", out, "--seed",
            str(args.seed), "--precision", args.precision, "--classes", *map(str, range(args.num_classes))]
    for flag, value in (("--tokenizer", args.tokenizer), ("--cfg-scale", scale), ("--cfg-power", power),
                        ("--batch-size", args.batch_size), ("--device", args.device)):
        argv += [flag, str(value)] if value is not None else []
    return argv


def reference_facts(path):
    """The reference batch: its fingerprint, image count and size, whether it stores FID statistics."""
    src = fid.load_source(path)
    images = src["images"]
    return {**fingerprint(path), "images": len(images) if images is not None else 0,
            "image_size": list(images.image_size()) if images is not None else None,
            "stored_statistics": "mu" in src and "mu_s" in src}


def generate(args):
    """Sample (every rank), then on rank 0 score, write <out>/reproduce.json and print the table; the manifest."""
    n = args.per_class * args.num_classes
    out = os.path.join(args.out, f"samples_{n}.npz")
    # checked before hours of sampling: the reference batch opens, the Inception file is at hand
    fid.load_source(args.ref)
    inception_path = weights.standard_weights(weights.INCEPTION_WEIGHTS, args.inception, args.offline)
    sample.main(sample_argv(args, out))
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    with open(os.path.splitext(out)[0] + ".json") as f:
        record = json.load(f)
    settings, config = record["settings"], record["generator_config"]
    size = {k: config[k] for k in ("width", "layers", "heads")}
    with np.load(out) as batch:
        counts = np.bincount(batch["arr_1"], minlength=args.num_classes).tolist()
    tokenizer = settings["tokenizer"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    manifest = {
        "model": args.model,
        "generator": {**fingerprint(args.generator), "config": config,
                      "preset": next((k for k, p in GENERATOR_PRESETS.items() if k != "tiny"
                                      and all(getattr(p, f) == v for f, v in size.items())), None)},
        "tokenizer": fingerprint(tokenizer) if os.path.isfile(tokenizer) else {"path": tokenizer},
        "sampling": {**settings, "seeds": SEEDS, "class_counts": counts,
                     "tf32": settings["device"].startswith("cuda")},    # sample.py allows TF32 matmuls on CUDA
        "samples": fingerprint(out),
        "reference": reference_facts(args.ref),
        "evaluator": {"program": "fid.py (OpenAI's ADM evaluator)", "mode": "adm", "precision": "fp32",
                      "tf32": False, "device": device, "inception": inception_facts(inception_path)},
        "environment": environment(),
    }
    model = inception.load_inception(inception_path, device=device)
    fid.check_same_size(fid.load_source(args.ref), fid.load_source(out))
    manifest["scores"] = fid.evaluate(args.ref, out, model, "adm", device=device)
    manifest["gaps"] = protocol_gaps(manifest)
    manifest["label"] = label("FID", n, manifest["gaps"])
    manifest["paper"] = None if manifest["gaps"] else PAPER[args.model]
    plumbing.save_json(os.path.join(args.out, "reproduce.json"), manifest)
    title = f"AliTok-{args.model}" if args.model else os.path.basename(args.generator)
    print(table(title, ROWS, manifest["scores"], manifest["paper"] or {}, n, manifest["gaps"]))
    return manifest


# --- The tokenizer: ImageNet val reconstructed, rFID / PSNR / codebook usage -------------------------

def reconstruct(args):
    """--tokenizer-only: score the stage-2 (and --stage1) reconstructions of --images; the manifest."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--tokenizer-only runs in one process: start it with python, not torchrun")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    inception_path = weights.standard_weights(weights.INCEPTION_WEIGHTS, args.inception, args.offline)
    net = inception.load_inception(inception_path, device=device)
    decoders = {}
    for path in filter(None, (args.tokenizer, args.stage1)):
        tok = checkpoints.load_tokenizer(sample.read_weights(path, "tokenizer"))
        name = "stage 1 (causal decoder)" if tok.config.causal else "stage 2 (bidirectional decoder)"
        decoders[name] = {**fingerprint(path), "scores": fid.reconstruction_scores(tok, args.images, net, "adm",
                                                                                   device=device)}
    first = next(iter(decoders.values()))["scores"]
    manifest = {
        "tokenizer": decoders,
        "images": {**fingerprint(args.images), "count": first["num_images"], "skipped": first["skipped"],
                   "image_size": first["image_size"], "crop": "ADM centre crop (data.center_crop_adm)"},
        "reconstruction": {"precision": "fp32", "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                           "tf32_cudnn": torch.backends.cudnn.allow_tf32, "pixels": "rounded to uint8"},
        "evaluator": {"program": "fid.py (OpenAI's ADM evaluator)", "mode": "adm", "precision": "fp32",
                      "device": device, "inception": inception_facts(inception_path)},
        "environment": environment(),
    }
    manifest["gaps"] = tokenizer_gaps(manifest)
    manifest["paper"] = None if manifest["gaps"] else PAPER_TOKENIZER
    plumbing.save_json(os.path.join(args.out, "reproduce.json"), manifest)
    for name, row in decoders.items():      # the paper's rFID is its final tokenizer's: stage 2 only
        gaps = manifest["gaps"] or (["the paper reports the stage-2 tokenizer"] if "stage 1" in name else [])
        print(table(f"tokenizer, {name}", TOKENIZER_ROWS, row["scores"], PAPER_TOKENIZER, first["num_images"], gaps))
    return manifest


# --- Command line -----------------------------------------------------------------------------------

def build_parser():
    """The command line (the protocol is the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--model", choices=list(PAPER), help="the paper's row to compare with (its released guidance is used)")
    add("--generator", metavar="GEN", help="alitok_{b,l,xl}.bin, or a train.py generator.pt")
    add("--tokenizer", metavar="TOK", help="AliTok.pth (default with --generator: the path the generator carries)")
    add("--ref", metavar="REF", help="the ADM reference batch, VIRTUAL_imagenet256_labeled.npz")
    add("--tokenizer-only", action="store_true", help="score the tokenizer's reconstructions of --images instead")
    add("--images", metavar="VAL", help="--tokenizer-only: ImageNet val, a folder or an npz (`arr_0` uint8 NHWC)")
    add("--stage1", metavar="CKPT", help="--tokenizer-only: also a stage-1 checkpoint's causal decoder")
    add("--out", default="runs/reproduce", help="folder of the samples and reproduce.json (default %(default)s)")
    add("--per-class", type=int, default=PER_CLASS, help="samples per class (default 50, the paper's)")
    add("--num-classes", type=int, default=NUM_CLASSES, help="classes 0..N-1 (default 1000, the paper's)")
    add("--seed", type=int, default=0, help="base seed of sample.py (default 0)")
    add("--cfg-scale", type=float, help="guidance scale (default: the released one of --model, else the generator's)")
    add("--cfg-power", type=float, help="guidance power (default: as --cfg-scale)")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="sampling precision (default fp32, the paper's)")
    add("--batch-size", type=int, help="sample.py's --batch-size (the samples do not depend on it)")
    add("--inception", metavar="PTH", help=f"{weights.INCEPTION_WEIGHTS} (default: the torch hub cache's copy)")
    add("--offline", action="store_true", help=f"never download (as {weights.OFFLINE_ENV}=1)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    return p


def run(argv=None):
    """The command line's work; the manifest (None on ranks other than 0). main() is its exit-status wrapper."""
    p = build_parser()
    args = p.parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    needed = ("--tokenizer", "--images") if args.tokenizer_only else ("--generator", "--ref")
    missing = [flag for flag in needed if getattr(args, flag[2:].replace("-", "_")) is None]
    if missing:
        p.error(f"{' and '.join(missing)} needed{' with --tokenizer-only' if args.tokenizer_only else ''}")
    plumbing.make_run_folder(args.out)
    return reconstruct(args) if args.tokenizer_only else generate(args)


def main(argv=None):
    """Run the command line; 0 on success (bad input raises; plumbing.cli turns it into one line and status 2)."""
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
