"""The paper's tokenizer ablation, rerun with seeds: bidirectional stage 1 / causal without prefix / causal
without aux / AliTok, each through stage 2 and a generator; held-out numbers as mean and spread.

    python ablation.py --data ../shared/datasets/cifar10_subset_32.npz --out runs/ablation
    python ablation.py --quick --out runs/ablation_quick      # a few steps per stage: checks the loop only

--jobs N trains N (variant, seed) runs at once, each with its share of the CPU threads. `make ablation` runs
one per core: on 2 cores, two single-thread runs of the tiny stage 1 trained 221 images/s together, one run
on both threads 180.

Every step is a train.py command (printed, and kept in <out>/commands.log). A run (variant, seed) whose
result.json exists is skipped, and a killed one continues from its checkpoints (--resume), so the same command
started again finishes the work. Writes <out>/ablation.json, ablation.md (table) and ablation.png (bar chart
with one standard deviation over seeds as error bars).
"""
import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import numpy as np
from PIL import Image, ImageDraw

import data
import fid
import plumbing
import weights

# Stage-1 switches of each variant (train.py flags); stage 2 and the generator are the same for all.
VARIANTS = {"bidirectional": ["--decoder", "bidirectional"], "no_prefix": ["--no-prefix"],
            "no_aux": ["--no-aux"], "alitok": []}
# Steps per stage (the demo's), training images, held-out images evaluated.
BUDGETS = {"full": dict(s1=1500, s2=600, ar=600, n_images=None, eval_images=1000, samples=1000),
           "quick": dict(s1=4, s2=3, ar=4, n_images=64, eval_images=32, samples=16)}
METRICS = (  # (result key, what it is), in the order of the table
    ("stage1_psnr", "stage-1 held-out PSNR (dB)"),
    ("psnr", "held-out PSNR (dB)"),
    ("stage1_rfid", "stage-1 held-out rFID"),
    ("rfid", "held-out rFID"),
    ("codebook_usage", "held-out codebook usage"),
    ("codebook_perplexity", "held-out code perplexity (exp of the codes' unigram entropy)"),
    ("loss", "held-out next-token loss (nats)"),
    ("acc", "held-out next-token accuracy"),
    ("prefix_acc", "held-out prefix-token accuracy"),
    ("image_acc", "held-out image-token accuracy"),
    ("fid", "FID of samples vs held-out"),
    ("inception_score", "IS of samples"),
)
CHART = ("psnr", "loss", "acc", "image_acc")
COLOURS = ((150, 150, 150), (86, 180, 233), (230, 159, 0), (0, 114, 178))


def script(name):
    """The path of a pipeline script, relative to the current folder where that is shorter (printed commands)."""
    path = os.path.join(ROOT, name)
    return min(path, os.path.relpath(path), key=len)


def last_heldout(metrics_path):
    """The last held-out record of a stage's metrics.jsonl, its keys without the "heldout_" prefix."""
    with open(metrics_path) as f:
        records = [json.loads(line) for line in f if "heldout_" in line]
    if not records:
        raise ValueError(f"{metrics_path}: no held-out record; expected train.py's heldout_* metrics")
    return {k[len("heldout_"):]: v for k, v in records[-1].items() if k.startswith("heldout_")}


def train_variant(variant, seed, args, budget):
    """Stage 1 (with the variant's switches), stage 2 and the generator of one (variant, seed), each resumed;
    the run's held-out numbers, also written to its result.json."""
    folder = os.path.join(args.out, variant, f"seed{seed}")
    result_path = os.path.join(folder, "result.json")
    if os.path.exists(result_path):
        print(f"skip {variant} seed {seed}: {result_path} exists", flush=True)
        with open(result_path) as f:
            return heldout_numbers(variant, seed, folder) | json.load(f)     # what it stored wins
    t0, (s1, s2, ar) = time.time(), (os.path.join(folder, s) for s in ("stage1", "stage2", "ar"))
    common = ["--data", args.data, "--seed", str(seed), "--eval-images", str(budget["eval_images"]),
              "--resume", "--no-progress"] + (["--inception", args.inception] if args.inception else [])
    common += ["--n-images", str(budget["n_images"])] if budget["n_images"] else []
    stages = [(s1, ["--stage", "1", *VARIANTS[variant]], budget["s1"], "stage2/tokenizer.pt"),
              (s2, ["--stage", "2", "--init", os.path.join(s1, "ckpt.pt")], budget["s2"], "stage2/tokenizer.pt"),
              (ar, ["--stage", "ar", "--tokenizer", os.path.join(s2, "tokenizer.pt")], budget["ar"],
               "ar/generator.pt")]
    for out, flags, steps, final in stages:
        if not os.path.exists(os.path.join(folder, final)):  # a finished stage is not started again
            run([sys.executable, script("train.py"), *flags, "--out", out, "--steps", str(steps), *common], args.out,
                args.threads)
    result = heldout_numbers(variant, seed, folder)
    if args.net is not None:
        result |= sample_scores(folder, seed, args, budget)
    result["minutes"] = (time.time() - t0) / 60
    plumbing.save_json(result_path, result)
    return result


def heldout_numbers(variant, seed, folder):
    """A finished run's last held-out numbers from its three stages' metrics.jsonl."""
    first, tokenizer, generator = (last_heldout(os.path.join(folder, stage, "metrics.jsonl"))
                                   for stage in ("stage1", "stage2", "ar"))
    return {"variant": variant, "seed": seed, "stage1_psnr": first["psnr"], "psnr": tokenizer["psnr"],
            "codebook_usage": tokenizer["codebook_usage"], "codebook_perplexity": tokenizer["codebook_perplexity"],
            **{k: generator[k] for k in ("loss", "acc", "prefix_acc", "image_acc") if k in generator},
            **({"stage1_rfid": first["rfid"], "rfid": tokenizer["rfid"]} if "rfid" in tokenizer else {})}


def sample_scores(folder, seed, args, budget):
    """FID and IS of budget["samples"] samples of the run's generator against as many held-out images."""
    n, samples = budget["samples"], os.path.join(folder, "samples.npz")
    run([sys.executable, script("sample.py"), "--ckpt", os.path.join(folder, "ar", "generator.pt"), "--npz", str(n), "--out",
         samples, "--seed", str(seed)], args.out, args.threads)
    size = int(np.load(samples)["arr_0"].shape[1])
    _, heldout = data.heldout_split(args.data, size, seed=seed, n_heldout=n)
    real = data.heldout_images(heldout)[0].permute(0, 2, 3, 1).numpy()        # N, S, S, 3
    plumbing.save_npz(os.path.join(folder, "heldout.npz"), arr_0=real)
    scores = fid.evaluate(os.path.join(folder, "heldout.npz"), samples, args.net)
    return {"fid": scores["fid"], "inception_score": scores["inception_score"]}


def run(cmd, out, threads=None):
    """Run one train.py command (with `threads` CPU threads when given), echoed to the terminal and to
    <out>/commands.log; raises if it fails."""
    line = "+ " + " ".join(cmd)
    sys.stdout.write(line + "\n")        # one write: lines of runs started at once do not interleave
    sys.stdout.flush()
    with open(os.path.join(out, "commands.log"), "a") as f:
        f.write(line + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    subprocess.run(cmd, check=True, env=env)


def summarize(results):
    """{variant: {"seeds": [...], metric: {"mean", "std" (over seeds, ddof 1; 0 for one seed), "values"}}}."""
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == variant]
        summary[variant] = {"seeds": [r["seed"] for r in rows]}
        for key, _ in METRICS:
            values = [r[key] for r in rows if key in r]
            if values:
                std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                summary[variant][key] = {"mean": float(np.mean(values)), "std": std, "values": values}
    return summary


def table(summary, budget):
    """The Markdown table: mean ± standard deviation over each variant's seeds per metric."""
    keys = [(k, what) for k, what in METRICS if any(k in s for s in summary.values())]
    lines = [f"Held-out metrics, mean ± std over the seeds listed; steps per stage {budget['s1']} / {budget['s2']}"
             f" / {budget['ar']} (stage 1 / stage 2 / generator)." + ("" if any("rfid" in s for s in summary.values())
             else " rFID and FID / IS: no Inception file."), "",
             "| variant | seeds | " + " | ".join(what for _, what in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for variant, metrics in summary.items():
        cells = [f"{metrics[k]['mean']:.4g} ± {metrics[k]['std']:.2g}" if k in metrics else "" for k, _ in keys]
        lines.append(f"| {variant} | {', '.join(map(str, metrics['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary, path, panel=(420, 320), margin=40):
    """One panel per CHART metric: a bar per variant at its mean, an error bar of one std, the value above."""
    variants, small, big = list(summary), plumbing.font(13), plumbing.font(15)
    image = Image.new("RGB", (panel[0] * len(CHART), panel[1]), "white")
    draw = ImageDraw.Draw(image)
    for k, key in enumerate(CHART):
        left0, base = k * panel[0] + margin // 2, panel[1] - margin
        draw.text((left0, 8), dict(METRICS)[key], fill="black", font=big)
        stats = [summary[v].get(key, {"mean": 0.0, "std": 0.0}) for v in variants]
        scale = (base - 2 * margin) / max(1e-9, max(s["mean"] + s["std"] for s in stats))
        width = (panel[0] - margin) // len(variants)
        for i, (variant, s) in enumerate(zip(variants, stats)):
            left, right = left0 + i * width + 6, left0 + (i + 1) * width - 6
            top, centre = base - s["mean"] * scale, (left + right) // 2
            draw.rectangle((left, top, right, base), fill=COLOURS[i % len(COLOURS)])
            high, low = base - (s["mean"] + s["std"]) * scale, base - max(0.0, s["mean"] - s["std"]) * scale
            draw.line((centre, high, centre, low), fill="black", width=2)
            draw.line((centre - 6, high, centre + 6, high), fill="black", width=2)
            draw.line((centre - 6, low, centre + 6, low), fill="black", width=2)
            draw.text((left, high - 18), f"{s['mean']:.3g}", fill="black", font=small)
            draw.text((left, base + 6), variant, fill="black", font=small)
        draw.line((left0, base, left0 + panel[0] - margin, base), fill="black")
    plumbing.atomic_write(path, lambda f: image.save(f, format="PNG"))


def run_threads(jobs, n_runs, cores):
    """(runs trained at once, CPU threads each, None for torch's default) for --jobs, n_runs runs and cores:
    the cores are shared by the runs that can go at once, not by --jobs."""
    jobs = min(jobs, n_runs)
    return jobs, (max(1, cores // jobs) if jobs > 1 else None)


def main(args):
    budget = dict(BUDGETS["quick" if args.quick else "full"])
    budget.update(dict(zip(("s1", "s2", "ar"), args.steps or ())))
    budget["n_images"] = args.n_images or budget["n_images"]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    args.net, why = fid.available_inception(args.inception)       # rFID, FID and IS only with it
    if args.net is None:
        print(f"rFID, FID and IS off: {why}", flush=True)
    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: expected 1 or more")
    t0, pairs = time.time(), [(v, seed) for seed in range(args.seeds) for v in args.variants]
    jobs, args.threads = run_threads(args.jobs, len(pairs), os.cpu_count() or 1)
    if args.report:                                          # the finished runs only
        done = lambda v, seed: os.path.exists(os.path.join(args.out, v, f"seed{seed}", "result.json"))
        pairs = [(v, seed) for v, seed in pairs if done(v, seed)]
        if not pairs:
            raise FileNotFoundError(f"--report: no finished run (<variant>/seed<N>/result.json) in {args.out}")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # each worker waits on its train.py
        results = list(pool.map(lambda pair: train_variant(*pair, args, budget), pairs))
    summary = summarize(results)
    plumbing.save_json(os.path.join(args.out, "ablation.json"),
                   {"data": args.data, "seeds": args.seeds, "budget": budget, "summary": summary, "runs": results,
                    "minutes_this_call": (time.time() - t0) / 60})
    plumbing.atomic_write(os.path.join(args.out, "ablation.md"), lambda f: f.write(table(summary, budget)), mode="w")
    bar_chart(summary, os.path.join(args.out, "ablation.png"))
    print(table(summary, budget), flush=True)
    print(f"wrote {args.out}/ablation.json, ablation.md, ablation.png")


def build_parser():
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="shapes", help="'shapes' (built-in), an ImageNet-layout folder, or an npz")
    p.add_argument("--out", default="runs/ablation", help="folder of all runs and the results")
    p.add_argument("--seeds", type=int, default=2, help="seeds per variant (0, 1, ...)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"some of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, nargs=3, metavar=("S1", "S2", "AR"), help="steps per stage")
    p.add_argument("--n-images", type=int, default=None, help="training images (default: all; quick: 64)")
    p.add_argument("--inception", default=None, metavar="PATH", help=f"FID Inception weights for rFID, FID and IS "
                   f"(default: the cached {weights.INCEPTION_WEIGHTS} if present)")
    p.add_argument("--report", action="store_true", help="train nothing: the table and chart of the runs that have "
                   "finished among the variants and seeds asked for")
    p.add_argument("--jobs", type=int, default=1, help="(variant, seed) runs trained at once (default 1)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the loop, learns little")
    return p


if __name__ == "__main__":
    sys.exit(plumbing.cli(main, build_parser().parse_args()))
