"""The paper's tokenizer ablation, rerun with paired seeds: AliTok against a bidirectional stage 1 (and, on
request, a causal stage 1 without prefix or without the aux loss), each through stage 2 and a generator;
held-out numbers per variant, and AliTok's paired differences with 95% intervals over seeds.

    python tools/ablation.py --data ../shared/datasets/cifar10_subset_32.npz --out runs/ablation
    python tools/ablation.py --variants bidirectional no_prefix no_aux alitok --seeds 3   # the other baselines too
    python tools/ablation.py --quick --out runs/ablation_quick --seeds 1    # a few steps per stage: the loop only
    python tools/ablation.py --report --data ../shared/datasets/cifar10_subset_32.npz --out runs/ablation
    python tools/ablation.py --data cifar10_subset_32.npz photos.npz --out runs/two   # one table across both

The default is 5 seeds of bidirectional and alitok (10 runs). On 2 cores the 10 runs at half the default steps
(--steps 750 300 300) took 108 minutes beside other work, so the default takes about 3.5 hours. --jobs N trains N
(variant, seed) runs at once, each with its share of the CPU threads. `make ablation` runs one per core: on 2
cores, two single-thread runs of the tiny stage 1 trained 221 images/s together, one run on both threads 180.

Paired seeds. Seed s of every variant trains on the same images in the same order with the same augmentations
(functions of seed, step and position), is evaluated on the same held-out images, and its generator starts
from the same initial weights with the same dropout stream. bidirectional and alitok have the same parameter
shapes and start stage 1 from identical weights; no_aux and no_prefix start from AliTok's initial weights
wherever name and shape match, which leaves out the aux head and no_prefix's prefix-dependent tensors (latent
tokens, positional tables). So alitok - other at one seed is a paired difference: the seed's draw of data
order and initial weights is shared, so it largely cancels, and the interval is over seeds of that difference.

Runs that went wrong are flagged: a collapsed codebook (held-out code perplexity below half the median of all
runs, COLLAPSE_FRACTION) and a tokenizer stuck near the mean image (stage-2 held-out PSNR at most 1 dB above
that of predicting every held-out image by their per-pixel mean, STUCK_MARGIN_DB). Flagged runs are listed
and left out of the means and the paired differences, unless --keep-flagged.

Every step is a train.py command (printed, and kept in <out>/commands.log). A run (variant, seed) whose
result.json exists is skipped, and a killed one continues from its checkpoints (--resume), so the same command
started again finishes the work. Writes <out>/ablation.json, ablation.md (tables: per variant, paired
differences, per run, each run once) and ablation.png (bars of mean ± one std over seeds; below them the paired
differences with their 95% intervals).

Several datasets (--data A B): each one's runs and its own ablation.json / .md / .png go to <out>/<name> (the
file or folder name without extension), and <out>/ablation.md reads them together: AliTok's paired differences on
every dataset side by side, which of them exclude 0 on which datasets, and every run once. To pool runs made by
separate commands, put (or link) each one's --out folder at <out>/<name> and run --report.
"""
import argparse
import concurrent.futures
import functools
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import numpy as np
from PIL import Image, ImageDraw
from scipy import stats

import alitok
import checkpoints
import data
import fid
import inception
import plumbing
import weights

# Stage-1 switches of each variant (train.py flags); stage 2 and the generator are the same for all.
VARIANTS = {"bidirectional": ["--decoder", "bidirectional"], "no_prefix": ["--no-prefix"],
            "no_aux": ["--no-aux"], "alitok": []}
DEFAULT_VARIANTS = ("bidirectional", "alitok")   # the comparison the paper makes; the others on request
DEFAULT_SEEDS = 5                                # the fewest for a t interval that is not mostly its quantile
REFERENCE = "alitok"                             # paired differences are REFERENCE - each other variant
LEVEL = 0.95                                     # confidence of the intervals on the paired differences
COLLAPSE_FRACTION = 0.5   # flagged below this fraction of the median held-out code perplexity of all runs
STUCK_MARGIN_DB = 1.0     # flagged at most this far above the PSNR of the mean held-out image
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
    ("prefix_loss", "held-out prefix-token loss (nats)"),
    ("image_loss", "held-out image-token loss (nats)"),
    ("acc", "held-out next-token accuracy"),
    ("prefix_acc", "held-out prefix-token accuracy"),
    ("image_acc", "held-out image-token accuracy"),
    ("context_gain", "context gain: ln(code perplexity) - loss (nats)"),
    ("fid", "FID of samples vs held-out"),
    ("inception_score", "IS of samples"),
)
PAIRED = ("loss", "prefix_loss", "image_loss", "acc", "prefix_acc", "image_acc", "psnr", "codebook_perplexity",
          "context_gain")
CHART = ("loss", "acc", "image_acc", "context_gain", "psnr")   # one column each: bars, paired differences
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


def train_variant(source, root, variant, seed, args, budget):
    """Stage 1 (with the variant's switches), stage 2 and the generator of one (variant, seed) on data `source`
    in <root>/<variant>/seed<seed>, each resumed; the run's held-out numbers, also written to its result.json."""
    folder = os.path.join(root, variant, f"seed{seed}")
    result_path, run_id = os.path.join(folder, "result.json"), {"data": source, "variant": variant, "seed": seed}
    if os.path.exists(result_path):
        print(f"skip {variant} seed {seed}: {result_path} exists", flush=True)
        with open(result_path) as f:           # its stored numbers win; which run it is, its folder says
            return heldout_numbers(variant, seed, folder) | json.load(f) | run_id
    t0, (s1, s2, ar) = time.time(), (os.path.join(folder, s) for s in ("stage1", "stage2", "ar"))
    common = ["--data", source, "--seed", str(seed), "--eval-images", str(budget["eval_images"]),
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
    result = heldout_numbers(variant, seed, folder) | run_id | {"eval_images": budget["eval_images"]}
    if args.net is not None:
        result |= sample_scores(source, folder, seed, args, budget)
    result["minutes"] = (time.time() - t0) / 60
    plumbing.save_json(result_path, result)
    return result


def heldout_numbers(variant, seed, folder):
    """A finished run's last held-out numbers from its three stages' metrics.jsonl, its image side (pixels)
    and the generator's context gain (nats)."""
    first, tokenizer, generator = (last_heldout(os.path.join(folder, stage, "metrics.jsonl"))
                                   for stage in ("stage1", "stage2", "ar"))
    numbers = {"variant": variant, "seed": seed, "image_size": image_size(folder), "stage1_psnr": first["psnr"],
               "psnr": tokenizer["psnr"], "codebook_usage": tokenizer["codebook_usage"],
               "codebook_perplexity": tokenizer["codebook_perplexity"],
               **{k: generator[k] for k in ("loss", "acc", "prefix_loss", "prefix_acc", "image_loss", "image_acc")
                  if k in generator},
               **({"stage1_rfid": first["rfid"], "rfid": tokenizer["rfid"]} if "rfid" in tokenizer else {})}
    if "loss" in numbers:
        numbers["context_gain"] = context_gain(numbers["codebook_perplexity"], numbers["loss"])
    return numbers


def context_gain(perplexity, loss):
    """ln(perplexity) - loss in nats: how far the generator's held-out loss is below the codes' unigram
    entropy (0: it predicts no better than the code frequencies; higher: it gains more from context)."""
    return math.log(perplexity) - loss


def image_size(folder):
    """The image side (pixels) a run's tokenizer was trained at: its stage-2 checkpoint's config, else the tiny
    preset's (train.py's default, which the ablation's commands keep)."""
    path = os.path.join(folder, "stage2", "tokenizer.pt")
    if os.path.exists(path):
        return int(checkpoints.read_checkpoint(path, "stage-2 tokenizer")["config"]["image_size"])
    return alitok.TOKENIZER_PRESETS["tiny"].image_size


@functools.lru_cache(maxsize=None)
def mean_image_psnr(source, size, seed, n_heldout):
    """PSNR in dB (mean over images, as train.py's held-out PSNR) of predicting each of a run's held-out
    images by their per-pixel mean image, rounded to uint8 as a reconstruction is: where a tokenizer that
    has learnt nothing but the mean image sits."""
    _, heldout = data.heldout_split(source, size, seed=seed, n_heldout=n_heldout)
    images = data.heldout_images(heldout)[0].numpy()                          # N, 3, S, S uint8
    mean = np.broadcast_to(images.mean(0, dtype=np.float64).round().astype(np.uint8), images.shape)
    return float(fid.psnr(images, mean).mean())


def sample_scores(source, folder, seed, args, budget):
    """FID and IS of budget["samples"] samples of the run's generator against as many held-out images of
    data `source`."""
    n, samples = budget["samples"], os.path.join(folder, "samples.npz")
    run([sys.executable, script("sample.py"), "--ckpt", os.path.join(folder, "ar", "generator.pt"), "--npz", str(n), "--out",
         samples, "--seed", str(seed)], args.out, args.threads)
    size = int(np.load(samples)["arr_0"].shape[1])
    _, heldout = data.heldout_split(source, size, seed=seed, n_heldout=n)
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


# ----------------------------------------------------------------------------------------------------
# Flags, means and paired differences
# ----------------------------------------------------------------------------------------------------

def run_flags(results, baselines):
    """What went wrong in each run, a list of reasons per run ([] for none): a collapsed codebook (perplexity
    below COLLAPSE_FRACTION of the median of all runs) or a tokenizer stuck near the mean image (PSNR at most
    STUCK_MARGIN_DB above baselines[i], the mean-image PSNR of run i's held-out images, dB)."""
    median = float(np.median([r["codebook_perplexity"] for r in results]))
    flags = []
    for r, baseline in zip(results, baselines):
        reasons = []
        if r["codebook_perplexity"] < COLLAPSE_FRACTION * median:
            reasons.append(f"collapsed codebook: perplexity {r['codebook_perplexity']:.3g} < {COLLAPSE_FRACTION:g}"
                           f" × the median {median:.3g}")
        if r["psnr"] <= baseline + STUCK_MARGIN_DB:
            reasons.append(f"stuck near the mean image: PSNR {r['psnr']:.2f} dB, mean image {baseline:.2f} dB")
        flags.append(reasons)
    return flags


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


def t_interval(values, level=LEVEL):
    """(mean, half-width of its Student's t interval at `level`: t(1/2 + level/2, n - 1) s / sqrt(n), s the
    standard deviation with ddof 1); the half-width is None for fewer than two values."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def paired_differences(results, reference=REFERENCE):
    """{"<reference> - <other>": {"seeds", "method", metric: {"differences" (one per seed), "mean", "half_width",
    "low", "high", "excludes_zero"}}}: per seed that both variants have, reference minus other; interval
    entries None with one seed."""
    by_run = {(r["variant"], r["seed"]): r for r in results}
    paired = {}
    for other in dict.fromkeys(r["variant"] for r in results if r["variant"] != reference):
        seeds = sorted(s for v, s in by_run if v == other and (reference, s) in by_run)
        if not seeds:
            continue
        method = (f"Student's t, {LEVEL:.0%}, over {len(seeds)} seeds" if len(seeds) > 1 else
                  "one seed: no interval")
        comparison = paired[f"{reference} - {other}"] = {"seeds": seeds, "method": method}
        for key in PAIRED:
            pairs = [(by_run[reference, s], by_run[other, s]) for s in seeds]
            if any(key not in a or key not in b for a, b in pairs):
                continue
            differences = [a[key] - b[key] for a, b in pairs]
            mean, half = t_interval(differences)
            low, high = (None, None) if half is None else (mean - half, mean + half)
            comparison[key] = {"differences": differences, "mean": mean, "half_width": half, "low": low,
                               "high": high, "excludes_zero": None if half is None else bool(low > 0 or high < 0)}
    return paired


# ----------------------------------------------------------------------------------------------------
# Tables and chart
# ----------------------------------------------------------------------------------------------------

def table(summary, budget, flagged=(), keep_flagged=False):
    """The Markdown table: mean ± standard deviation over each variant's seeds per metric; its caption names
    the flagged runs (flagged: [(variant, seed, reasons)]) and whether they were left out."""
    keys = [(k, what) for k, what in METRICS if any(k in s for s in summary.values())]
    caption = (f"Held-out metrics, mean ± std over the seeds listed; steps per stage {budget['s1']} / "
               f"{budget['s2']} / {budget['ar']} (stage 1 / stage 2 / generator).")
    caption += "" if any("rfid" in s for s in summary.values()) else " rFID and FID / IS: no Inception file."
    if flagged:
        what = "kept in (--keep-flagged)" if keep_flagged else "left out of the means and the paired differences"
        caption += (f" {len(flagged)} flagged run(s) {what}: " +
                    "; ".join(f"{v} seed {s} ({', '.join(reasons)})" for v, s, reasons in flagged) + ".")
    if not summary:
        return caption + " No run is left to average: use --keep-flagged to see them.\n"
    lines = [caption, "", "| variant | seeds | " + " | ".join(what for _, what in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for variant, metrics in summary.items():
        cells = [f"{metrics[k]['mean']:.4g} ± {metrics[k]['std']:.2g}" if k in metrics else "" for k, _ in keys]
        lines.append(f"| {variant} | {', '.join(map(str, metrics['seeds']))} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_table(paired):
    """Markdown tables, one per comparison: per-seed differences, their mean and 95% interval, and whether the
    interval excludes 0 (the method in the caption)."""
    if not paired:
        return f"Paired differences: no seed has an unflagged run of both {REFERENCE} and another variant.\n"
    names = dict(METRICS)
    lines = []
    for comparison, d in paired.items():
        seeds, n = d["seeds"], len(d["seeds"])
        how = (f"mean ± t(0.975, {n - 1}) · s / √{n}, s the std over seeds with ddof 1" if n > 1 else
               "with one seed there is no interval")
        lines += [f"Paired differences {comparison} per seed (same seed: same data order, augmentations, held-out "
                  f"images and shared initial weights); mean and {LEVEL:.0%} interval ({d['method']}: {how}).", "",
                  "| metric | " + " | ".join(f"seed {s}" for s in seeds) + f" | mean | {LEVEL:.0%} interval | "
                  "excludes 0 |", "|---|" + "---|" * (n + 3)]
        for key in PAIRED:
            if key in d:
                m = d[key]
                interval = "none (one seed)" if m["half_width"] is None else f"[{m['low']:+.4g}, {m['high']:+.4g}]"
                excludes = {None: "-", True: "yes", False: "no"}[m["excludes_zero"]]
                lines.append(f"| {names[key]} | " + " | ".join(f"{x:+.4g}" for x in m["differences"]) +
                             f" | {m['mean']:+.4g} | {interval} | {excludes} |")
        lines.append("")
    return "\n".join(lines)


def runs_table(results, names=None):
    """Markdown table of every run, once: the numbers the flags look at, the mean-image PSNR and the flags;
    with names ({data source: name}) a first column names each run's dataset."""
    data = "| data " if names else ""
    where = "each dataset's own ablation.md" if names else "the first table's caption"
    lines = [f"Runs (flagged ones are listed in {where}).", "",
             f"{data}| variant | seed | held-out PSNR (dB) | mean-image PSNR (dB) | code perplexity | next-token "
             "loss | flags |", "|---" * (7 + bool(names)) + "|"]
    for r in results:
        loss = f"{r['loss']:.4g}" if "loss" in r else ""
        lines.append((f"| {names[r['data']]} " if names else "") +
                     f"| {r['variant']} | {r['seed']} | {r['psnr']:.4g} | {r['mean_image_psnr']:.4g} | "
                     f"{r['codebook_perplexity']:.4g} | {loss} | {'; '.join(r['flags']) or '-'} |")
    return "\n".join(lines) + "\n"


def across_table(paired, names, budget):
    """Markdown tables, one per comparison: each dataset's mean paired difference and 95% interval per metric
    side by side, and the datasets on which the interval excludes 0. paired: {data source: paired_differences},
    names: {data source: name}."""
    comparisons = list(dict.fromkeys(c for p in paired.values() for c in p))
    lines = [f"Paired differences on {len(paired)} datasets, each over its own seeds; steps per stage "
             f"{budget['s1']} / {budget['s2']} / {budget['ar']}. Per dataset: mean [{LEVEL:.0%} Student's t "
             "interval], * where it excludes 0.", ""]
    for comparison in comparisons:
        on = {s: p[comparison] for s, p in paired.items() if comparison in p}
        lines += [f"| {comparison} | " + " | ".join(f"{names[s]} (seeds {', '.join(map(str, d['seeds']))})"
                                                    for s, d in on.items()) + " | excludes 0 on |",
                  "|---|" + "---|" * len(on) + "---|"]
        for key in PAIRED:
            cells, apart = [], []
            for source, d in on.items():
                m = d.get(key)
                if m is None:
                    cells.append("")
                elif m["half_width"] is None:
                    cells.append(f"{m['mean']:+.3g} (one seed)")
                else:
                    cells.append(f"{m['mean']:+.3g} [{m['low']:+.3g}, {m['high']:+.3g}]" +
                                 (" *" if m["excludes_zero"] else ""))
                    apart += [names[source]] if m["excludes_zero"] else []
            lines.append(f"| {dict(METRICS)[key]} | " + " | ".join(cells) + f" | {', '.join(apart) or 'none'} |")
        lines.append("")
    return "\n".join(lines)


def axis(values, top, base):
    """The y pixel of a value on an axis that spans `values` and 0 between pixel rows `top` and `base`."""
    low, high = min(0.0, *values), max(0.0, *values)
    pad = 0.1 * (high - low) or 1.0                   # room for dots and labels; a flat axis gets a unit
    low, high = (low - pad if low < 0 else low), (high + pad if high > 0 or low == 0 else high)
    return lambda v: base - (v - low) / (high - low) * (base - top)


def whisker(draw, centre, high, low):
    """A vertical error bar with end caps from pixel row `high` to `low` at column `centre`."""
    draw.line((centre, high, centre, low), fill="black", width=2)
    for row in (high, low):
        draw.line((centre - 6, row, centre + 6, row), fill="black", width=2)


def bar_panel(draw, box, key, summary, fonts, margin):
    """In box (left, top, right, bottom px): a bar per variant at its mean of `key`, an error bar of one std,
    the mean above it."""
    (left0, top, right0, bottom), (small, big), base = box, fonts, box[3] - margin
    draw.text((left0, top + 8), dict(METRICS)[key], fill="black", font=big)
    stats_ = [summary[v].get(key, {"mean": 0.0, "std": 0.0}) for v in summary]
    y = axis([s["mean"] + sign * s["std"] for s in stats_ for sign in (-1, 1)], top + 2 * margin, base)
    width = (right0 - left0) // len(summary)
    for i, (variant, s) in enumerate(zip(summary, stats_)):
        left, right = left0 + i * width + 6, left0 + (i + 1) * width - 6
        draw.rectangle((left, min(y(0), y(s["mean"])), right, max(y(0), y(s["mean"]))),
                       fill=COLOURS[i % len(COLOURS)])
        high = y(s["mean"] + s["std"])
        whisker(draw, (left + right) // 2, high, y(s["mean"] - s["std"]))
        draw.text((left, high - 18), f"{s['mean']:.3g}", fill="black", font=small)
        draw.text((left, base + 6), variant, fill="black", font=small)
    draw.line((left0, y(0), right0, y(0)), fill="black")


def difference_panel(draw, box, key, paired, fonts, margin):
    """In box (left, top, right, bottom px), per comparison: the per-seed paired differences of `key` (grey
    dots), their mean (black dot) and its 95% interval (error bar), against a zero line."""
    (left0, top, right0, bottom), (small, big), base = box, fonts, box[3] - margin - 16   # 3 lines below
    title = f"{REFERENCE} - other: {dict(METRICS)[key].split(' (')[0]}"        # the unit is the bars'
    draw.text((left0, top + 8), title, fill="black", font=big)
    draw.text((left0, top + 28), f"seeds (grey), mean and {LEVEL:.0%} Student's t interval", fill="black",
              font=small)
    shown = [(c, d[key]) for c, d in paired.items() if key in d]
    values = [v for _, m in shown for v in (*m["differences"], m["low"], m["high"]) if v is not None]
    y = axis(values or [0.0], top + 2 * margin + 20, base)
    draw.line((left0, y(0), right0, y(0)), fill=(120, 120, 120))
    draw.text((right0 - 12, y(0) - 16), "0", fill=(120, 120, 120), font=small)
    width = (right0 - left0) // max(1, len(shown))
    for i, (comparison, m) in enumerate(shown):
        centre = left0 + i * width + width // 2
        for d in m["differences"]:
            draw.ellipse((centre - 22, y(d) - 3, centre - 16, y(d) + 3), fill=(150, 150, 150))
        if m["half_width"] is not None:
            whisker(draw, centre, y(m["high"]), y(m["low"]))
        draw.ellipse((centre - 5, y(m["mean"]) - 5, centre + 5, y(m["mean"]) + 5), fill="black")
        interval = "one seed: no interval" if m["half_width"] is None else f"[{m['low']:+.2g}, {m['high']:+.2g}]"
        label = f"vs {comparison.split(' - ', 1)[1]}\n{m['mean']:+.3g}\n{interval}"
        draw.multiline_text((left0 + i * width + 6, base + 6), label, fill="black", font=small, spacing=2)


def bar_chart(summary, path, paired=None, panel=(420, 320), margin=40):
    """One column per CHART metric: a bar per variant at its mean, one std as error bar; with `paired`, below
    it the paired differences with their 95% intervals."""
    rows = 2 if paired else 1
    image = Image.new("RGB", (panel[0] * len(CHART), panel[1] * rows), "white")
    draw, fonts = ImageDraw.Draw(image), (plumbing.font(13), plumbing.font(15))
    for k, key in enumerate(CHART):
        left, right = k * panel[0] + margin // 2, (k + 1) * panel[0] - margin // 2
        bar_panel(draw, (left, 0, right, panel[1]), key, summary, fonts, margin)
        if paired:
            difference_panel(draw, (left, panel[1], right, 2 * panel[1]), key, paired, fonts, margin)
    plumbing.atomic_write(path, lambda f: image.save(f, format="PNG"))


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

def run_threads(jobs, n_runs, cores):
    """(runs trained at once, CPU threads each, None for torch's default) for --jobs, n_runs runs and cores:
    the cores are shared by the runs that can go at once, not by --jobs."""
    jobs = min(jobs, n_runs)
    return jobs, (max(1, cores // jobs) if jobs > 1 else None)


def flag(results, args, budget):
    """Each result of one dataset with its mean-image PSNR (dB), its flags and whether it is left out
    ("excluded")."""
    held = lambda r: r.get("eval_images", budget["eval_images"])           # runs before it was stored
    baselines = [mean_image_psnr(r["data"], r["image_size"], r["seed"], held(r)) for r in results]
    return [r | {"mean_image_psnr": b, "flags": reasons, "excluded": bool(reasons) and not args.keep_flagged}
            for r, b, reasons in zip(results, baselines, run_flags(results, baselines))]


def report(results, source, folder, args, budget, minutes):
    """<folder>/ablation.json, ablation.md and ablation.png of one dataset's runs (flagged ones left out unless
    --keep-flagged); the tables also printed. Returns the paired differences."""
    kept = [r for r in results if not r["excluded"]]
    summary, paired = summarize(kept), paired_differences(kept)
    flagged = [(r["variant"], r["seed"], r["flags"]) for r in results if r["flags"]]
    plumbing.save_json(os.path.join(folder, "ablation.json"),
                       {"data": source, "seeds": args.seeds, "budget": budget,
                        "keep_flagged": args.keep_flagged, "thresholds": {
                            "collapse_fraction": COLLAPSE_FRACTION, "stuck_margin_db": STUCK_MARGIN_DB},
                        "summary": summary, "paired": paired, "runs": results, "minutes_this_call": minutes})
    tables = table(summary, budget, flagged, args.keep_flagged), paired_table(paired), runs_table(results)
    write_tables(folder, "\n".join(tables), with_chart=bool(summary))
    if summary:
        bar_chart(summary, os.path.join(folder, "ablation.png"), paired)
    return paired


def write_tables(folder, text, with_chart=False):
    """<folder>/ablation.md, also printed."""
    plumbing.atomic_write(os.path.join(folder, "ablation.md"), lambda f: f.write(text), mode="w")
    print(text, flush=True)
    print(f"wrote {folder}/ablation.json, ablation.md" + (", ablation.png" if with_chart else ""))


def dataset_folders(sources, out):
    """{source: its runs' folder}: `out` itself for one dataset, <out>/<name> for several (name: the file or
    folder name without extension)."""
    if len(sources) == 1:
        return {sources[0]: out}
    names = {s: os.path.splitext(os.path.basename(os.path.normpath(s)))[0] for s in sources}
    same = [s for s in sources if list(names.values()).count(names[s]) > 1]
    if same:
        raise ValueError(f"--data {' '.join(same)}: two datasets with one name would share a folder under "
                         f"{out}; rename or link one of them")
    return {s: os.path.join(out, names[s]) for s in sources}


FLAG_RULES = {"--seeds": "count", "--steps": "count", "--n-images": "count", "--jobs": "count"}


def main(args):
    plumbing.check_flags(args, FLAG_RULES)                  # before any folder is made
    budget = dict(BUDGETS["quick" if args.quick else "full"])
    budget.update(dict(zip(("s1", "s2", "ar"), args.steps or ())))
    budget["n_images"] = args.n_images or budget["n_images"]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    folders = dataset_folders(list(dict.fromkeys(args.data)), args.out)     # a name given twice is one dataset
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    args.net, why = inception.available_inception(args.inception)       # rFID, FID and IS only with it
    if args.net is None:
        print(f"rFID, FID and IS off: {why}", flush=True)
    # each (dataset, variant, seed) once, however often a name was given
    variants = list(dict.fromkeys(args.variants))
    runs = [(s, folders[s], v, seed) for s in folders for seed in range(args.seeds) for v in variants]
    t0 = time.time()
    jobs, args.threads = run_threads(args.jobs, len(runs), os.cpu_count() or 1)
    if args.report:                                          # the finished runs only
        done = lambda root, v, seed: os.path.exists(os.path.join(root, v, f"seed{seed}", "result.json"))
        runs = [(s, root, v, seed) for s, root, v, seed in runs if done(root, v, seed)]
        missing = [f"{root} (--data {s})" for s, root in folders.items() if all(r[0] != s for r in runs)]
        if missing:
            raise FileNotFoundError(f"--report: no finished run (<variant>/seed<N>/result.json) in "
                                    f"{', '.join(missing)}")
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # each worker waits on its train.py
        results = list(pool.map(lambda one: train_variant(*one, args, budget), runs))
    minutes, checked, paired = (time.time() - t0) / 60, [], {}
    for source, folder in folders.items():                   # flags compare a run with its own dataset's runs
        own = flag([r for r in results if r["data"] == source], args, budget)
        paired[source] = report(own, source, folder, args, budget, minutes)
        checked += own
    if len(folders) > 1:
        names = {s: os.path.basename(f) for s, f in folders.items()}
        plumbing.save_json(os.path.join(args.out, "ablation.json"), {
            "data": list(folders), "folders": folders, "budget": budget, "paired": paired, "runs": checked})
        write_tables(args.out, across_table(paired, names, budget) + "\n" + runs_table(checked, names))


def build_parser():
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=["shapes"], help="'shapes' (built-in), an ImageNet-layout folder, "
                   "or an npz; several: each one's runs in <out>/<name> and one table across them; with --report "
                   "the runs' own (the mean-image PSNR of the flags is computed from it)")
    p.add_argument("--out", default="runs/ablation", help="folder of all runs and the results")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per variant (0, 1, ...; default "
                   f"{DEFAULT_SEEDS})")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), help=f"some of {list(VARIANTS)} "
                   f"(default: {' '.join(DEFAULT_VARIANTS)})")
    p.add_argument("--steps", type=int, nargs=3, metavar=("S1", "S2", "AR"), help="steps per stage")
    p.add_argument("--n-images", type=int, default=None, help="training images (default: all; quick: 64)")
    p.add_argument("--inception", default=None, metavar="PATH", help=f"FID Inception weights for rFID, FID and IS "
                   f"(default: the cached {weights.INCEPTION_WEIGHTS} if present)")
    p.add_argument("--report", action="store_true", help="train nothing: the tables and chart of the runs that "
                   "have finished among the variants and seeds asked for")
    p.add_argument("--keep-flagged", action="store_true", help="keep flagged runs (collapsed codebook, stuck near "
                   "the mean image) in the means and paired differences (default: listed and left out)")
    p.add_argument("--jobs", type=int, default=1, help="(variant, seed) runs trained at once (default 1)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage: checks the loop, learns little")
    return p


if __name__ == "__main__":
    sys.exit(plumbing.cli(main, build_parser().parse_args()))
