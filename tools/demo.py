"""The whole method on a laptop CPU: stage 1 -> stage 2 -> ten-crop codes -> generator -> samples -> scores.

    python tools/demo.py                  # tiny preset, built-in shapes, about 20 minutes on 2 cores
    python tools/demo.py --offline        # no downloads: rFID / FID / IS only if the Inception file is cached

Each step is the command it prints (so you can re-run any of them by hand) and is skipped or resumed when
its output exists: a demo that is killed and started again continues. Results land in one run folder:
reconstruction grids of both stages, a class-by-class sample grid, metrics.json and the logs.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import numpy as np
import torch

import checkpoints
import data
import fid
import inception
import plumbing
import weights

# Steps per stage: the full demo, and a quick pass that only checks the pipeline runs (CI).
SCHEDULES = {"full": dict(s1=1500, s2=600, ar=600, n_images=5000, samples=500, val=1000),
             "quick": dict(s1=30, s2=20, ar=30, n_images=256, samples=40, val=200)}
FLAG_RULES = {"--seed": "index"}  # the range of each numeric flag (plumbing.check_flags)


def script(name):
    """The path of a pipeline script, relative to the current folder where that is shorter (printed commands)."""
    path = os.path.join(ROOT, name)
    return min(path, os.path.relpath(path), key=len)


def run(cmd, log):
    """Run one pipeline command, echoing it; its output goes to the terminal and to the run's log."""
    print("+ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
    subprocess.run(cmd, check=True)


def val_images(n, size):
    """The held-out shapes split as uint8 NHWC [n, size, size, 3] and labels [n]."""
    ds = data.build_dataset("shapes", size, split="val", n_images=n)
    x = torch.stack([ds[i][0] for i in range(n)])
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), np.array([ds[i][1] for i in range(n)])


@torch.no_grad()
def tokenizer_scores(path, images):
    """Reconstruction PSNR (dB, uint8 images) and codebook usage of a tokenizer on held-out images."""
    tok = checkpoints.load_tokenizer(path)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    codes = torch.cat([tok.encode(b) for b in x.split(100)])
    rec = torch.cat([tok.decode(c) for c in codes.split(100)])
    rec = (rec.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()   # scored as saved images
    used = torch.bincount(codes.flatten(), minlength=tok.config.codebook_size) > 0
    return {"psnr": float(fid.psnr(images, rec).mean()), "codebook_usage": float(used.float().mean())}


def class_agreement(samples, labels, real, real_labels):
    """Fraction of samples whose nearest real class mean (pixels) is their own class: do samples look right?"""
    flat = lambda a: torch.from_numpy(a).float().flatten(1) / 255
    means = torch.stack([flat(real[real_labels == c]).mean(0) for c in range(int(real_labels.max()) + 1)])
    guess = torch.cdist(flat(samples), means).argmin(1).numpy()
    chance = torch.cdist(flat(real), means).argmin(1).numpy()
    return float((guess == labels).mean()), float((chance == real_labels).mean())


def last_record(path):
    with open(path) as f:
        return json.loads(f.readlines()[-1])


def inception_scores(args, out, tokenizers, samples):
    """rFID of each tokenizer file and FID / IS of the samples against {out}/val.npz, with the FID Inception
    (--inception, the cache, or a download); without it, a line saying how to get it and an empty dict."""
    try:
        net = inception.load_inception(args.inception, args.offline)
    except (OSError, ValueError) as error:
        print(f"rFID / FID / IS skipped: {error}", flush=True)
        return {}
    scores = {f"rfid_{name}": fid.reconstruction_scores(checkpoints.load_tokenizer(path), f"{out}/val.npz", net)["rfid"]
              for name, path in tokenizers.items()}
    both = fid.evaluate(f"{out}/val.npz", samples, net)
    return scores | {"fid": both["fid"], "inception_score": both["inception_score"]}


def main(argv=None):
    """The pipeline (see the module docstring); a failed step's exit status, else 0."""
    args = parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    try:
        pipeline(args)
    except subprocess.CalledProcessError as error:
        print(f"error: step `{' '.join(error.cmd)}` failed (exit status {error.returncode}; its message is above). "
              f"Fix it and run the demo again: finished steps are kept", file=sys.stderr)
        return error.returncode
    return 0


def pipeline(args):
    """Train, sample and score; every step is skipped or resumed when its output exists."""
    sched = SCHEDULES["quick" if args.quick else "full"]
    out, py = args.out, sys.executable
    os.makedirs(out, exist_ok=True)
    log, t0 = os.path.join(out, "commands.log"), time.time()
    seed = ["--seed", str(args.seed)]
    common = ["--n-images", str(sched["n_images"]), "--resume", *seed] + (["--no-progress"] if args.quick else [])
    common += ["--offline"] if args.offline else []
    s1, s2, ar = (os.path.join(out, d) for d in ("stage1", "stage2", "ar"))
    run([py, script("train.py"), "--stage", "1", "--out", s1, "--steps", str(sched["s1"]), *common], log)
    run([py, script("train.py"), "--stage", "2", "--init", f"{s1}/ckpt.pt", "--out", s2, "--steps", str(sched["s2"]),
         *common], log)
    run([py, script("train.py"), "--stage", "ar", "--tokenizer", f"{s2}/tokenizer.pt", "--out", ar, "--steps",
         str(sched["ar"]), *common], log)
    gen = f"{ar}/generator.pt"
    run([py, script("sample.py"), "--ckpt", gen, "--out", f"{out}/grid.png", *seed], log)
    run([py, script("sample.py"), "--ckpt", gen, "--npz", str(sched["samples"]), "--out", f"{out}/samples.npz", *seed], log)

    print("scoring ...", flush=True)
    size = checkpoints.load_tokenizer(f"{s2}/tokenizer.pt").config.image_size
    real, real_labels = val_images(sched["val"], size)
    plumbing.save_npz(f"{out}/val.npz", arr_0=real, arr_1=real_labels)
    smp = np.load(f"{out}/samples.npz")
    agree, real_agree = class_agreement(smp["arr_0"], smp["arr_1"], real, real_labels)
    gen_log = last_record(f"{ar}/metrics.jsonl")
    metrics = {"stage1": tokenizer_scores(f"{s1}/ckpt.pt", real), "stage2": tokenizer_scores(f"{s2}/tokenizer.pt", real),
               "generator": {"loss": gen_log["loss"], "token_accuracy": gen_log["acc"]},
               "samples": {"n": int(len(smp["arr_0"])), "class_agreement": agree, "real_class_agreement": real_agree,
                           "chance": 1 / 10}}
    tokenizers = {"stage1": f"{s1}/ckpt.pt", "stage2": f"{s2}/tokenizer.pt"}
    metrics |= inception_scores(args, out, tokenizers, f"{out}/samples.npz")
    metrics["minutes"] = (time.time() - t0) / 60
    plumbing.save_json(f"{out}/metrics.json", metrics)
    print(json.dumps(metrics, indent=2))
    print(f"pictures: {s1}/latest.png {s2}/latest.png {out}/grid.png; metrics: {out}/metrics.json")


def parse_args(argv=None):
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--inception", default=None, help=f"FID Inception weights, for rFID, FID and IS (default: the "
                   f"torch hub cache's {weights.INCEPTION_WEIGHTS}, downloaded on first use)")
    p.add_argument("--offline", action="store_true", help=f"never download (as {weights.OFFLINE_ENV}=1): without the "
                   f"cached Inception file the demo reports everything but rFID / FID / IS")
    p.add_argument("--seed", type=int, default=0, help="seed of every training and sampling step (default 0)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the pipeline, learns little")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
