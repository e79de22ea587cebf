"""Sample from an AliTok generator: an image grid, or the ADM sample batch (npz) that fid.py scores.

Read beside "AliTok" (arXiv 2506.05289), Sec. 4, and ALITOK_SPEC.md section 2 "Sampling": temperature 1,
no top-k / top-p, power-cosine guidance with each size's released scale g and power p, the conditional and
unconditional halves run as one doubled batch over a KV cache. Sample i draws from its own seed,
seed * 1000003 + i; generation runs at least 8 samples at a time and the tokenizer decodes 32 at a time, whatever
--batch-size (batches are padded; see MIN_BATCH). So on one CPU the codes, the pixels and the npz file are
bit-identical for any --batch-size and number of processes, in float32 and bf16 (on a GPU, kernels chosen per
batch shape may round differently). Defaults are the paper's evaluation: float32 (TF32 allowed on a GPU), npz
pixels truncated to uint8.

examples:
  # a grid of 8 ImageNet classes (one row each) x 8 samples -> out/alitok_b_grid.png and .json
  python sample.py --ckpt alitok_b.bin --tokenizer AliTok.pth

  # the 50k evaluation batch (50 per class, shuffled) on 8 GPUs; rerun the same line to resume
  torchrun --nproc_per_node=8 sample.py --ckpt alitok_b.bin --tokenizer AliTok.pth --npz 50000 \\
      --out out/alitok_b_50k.npz
  python fid.py VIRTUAL_imagenet256_labeled.npz out/alitok_b_50k.npz --inception pt_inception-2015-12-05-6726825d.pth

  # a generator checkpoint from train.py carries its tokenizer's path: --tokenizer is optional
  python sample.py --ckpt GEN.pt --per-class 4
"""
import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import plumbing
import speed
from alitok import check_classes
from checkpoints import class_names, codebook_fingerprint, load_generator, load_tokenizer, read_checkpoint

SEED_STRIDE = 1_000_003  # above any sample count: seeds of two base seeds never coincide (N < 1,000,003)
IMAGENET_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py selection (retriever, otter, ...)
RELEASE_NOTE = ("The released weights (alitok_b.bin, alitok_l.bin, alitok_xl.bin, AliTok.pth) come from the AliTok "
                "release (arXiv 2506.05289), not with this code; train.py makes this project's checkpoints. "
                "Without any file, `make bench` times sampling on random weights.")
# What decides the samples: shards written under other values must not be mixed into one file.
SHARD_KEYS = ("generator", "generator_stamp", "tokenizer", "tokenizer_stamp", "n", "classes", "seed", "cfg_scale",
              "cfg_power", "temperature", "top_k", "top_p", "precision", "shard_size")
# On a CPU the rounding of a product can depend on its number of rows: MKL multiplies fewer than 4 rows with
# other kernels, and a 3-channel 1x1 convolution (the decoder's last layer) takes another path below 16 images.
# So generation runs at least MIN_BATCH samples (2 rows each with guidance) and the tokenizer decodes
# DECODE_BATCH images at a time, each at a fixed place in its batch: a sample does not depend on --batch-size.
MIN_BATCH, DECODE_BATCH = 8, 32
# The range of each numeric flag (plumbing.check_flags), checked before anything is loaded or written
FLAG_RULES = {"--classes": "index", "--per-class": "count", "--npz": "count", "--shard-size": "count",
              "--cfg-scale": "finite", "--cfg-power": "nonnegative", "--temperature": "nonnegative",
              "--top-k": "index", "--top-p": "fraction", "--seed": "seed", "--batch-size": "count"}


# --- Loading the generator and its tokenizer --------------------------------------------------------

def read_weights(path, what):
    """read_checkpoint, with where the released files come from when `path` is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path!r}. {RELEASE_NOTE}")
    return read_checkpoint(path, what)


def load_models(gen_path, tok_path=None, device="cpu", precision="fp32", accept_tokenizer=False, ckpt=None):
    """(generator, tokenizer, tokenizer source) on device, eval mode, through speed.for_inference (bf16: both
    models' block weights held in bfloat16). The tokenizer: tok_path, else the one the generator checkpoint carries
    (train.py writes its path). A tokenizer whose codebook is not the one the checkpoint's fingerprint names is
    refused (accept_tokenizer: used, with a warning). ckpt: the generator file as read already (default: read from
    gen_path)."""
    ckpt = read_weights(gen_path, "generator checkpoint") if ckpt is None else ckpt
    generator = load_generator(ckpt, source=f"--ckpt {gen_path!r}")
    source = tok_path or (ckpt.get("tokenizer") if isinstance(ckpt, dict) else None)
    if source is None:
        raise FileNotFoundError(f"no tokenizer: {gen_path!r} carries no tokenizer path, so pass --tokenizer TOK "
                                f"(the released AliTok.pth, or the tokenizer checkpoint the generator was trained "
                                f"on); images cannot be decoded without it. {RELEASE_NOTE}")
    if not isinstance(source, str):
        tokenizer, source = load_tokenizer(source), "embedded in the generator checkpoint"
    else:
        beside = os.path.join(os.path.dirname(gen_path), source)  # a relative path written from another folder
        source = source if tok_path or os.path.isfile(source) or not os.path.isfile(beside) else beside
        what = "--tokenizer" if tok_path else f"tokenizer (the path carried by {gen_path!r})"
        tokenizer = load_tokenizer(read_weights(source, what), source=f"{what} {source!r}")
        source = os.path.abspath(source)
    g, t = generator.config, tokenizer.config
    if (g.codebook_size, g.n_prefix, g.grid) != (t.codebook_size, t.n_prefix, t.grid):
        raise ValueError(f"generator and tokenizer do not fit: the generator samples {g.n_prefix} + {g.grid}^2 "
                         f"tokens from {g.codebook_size} codes, the tokenizer decodes {t.n_prefix} + {t.grid}^2 "
                         f"from {t.codebook_size}")
    check_fingerprint(ckpt, gen_path, tokenizer, source, accept_tokenizer)
    generator = speed.for_inference(generator.to(device), precision)
    return generator, speed.for_inference(tokenizer.to(device), precision), source


def default_batch(cfg, device, precision):
    """--batch-size's default: 32 on a CPU; on a GPU the largest power of two <= 256 whose KV cache (both guidance
    halves, every layer) takes at most a quarter of the free memory."""
    if device.type != "cuda":
        return 32
    free, _ = torch.cuda.mem_get_info(device)
    per_sample = 2 * 2 * cfg.layers * (cfg.n_tokens + 1) * cfg.width * (2 if precision == "bf16" else 4)
    return max(1, min(256, 2 ** int(math.log2(max(1, free / 4 / per_sample)))))


def check_fingerprint(ckpt, gen_path, tokenizer, source, accept=False):
    """Raise ValueError (accept: warn) when the generator checkpoint names another codebook than the tokenizer's:
    its codes would decode to wrong images. The released generator files carry no fingerprint: nothing to check."""
    trained = ckpt.get("tokenizer_fingerprint") if isinstance(ckpt, dict) else None
    found = codebook_fingerprint(tokenizer)
    if trained is None or trained == found:
        return
    trained_on = ckpt.get("tokenizer") if isinstance(ckpt.get("tokenizer"), str) else "another tokenizer"
    said = (f"the tokenizer {source} (codebook fingerprint {found}) is not the one the generator {gen_path} was "
            f"trained on ({trained_on}, codebook fingerprint {trained}): its codes would decode to wrong images")
    if not accept:
        raise ValueError(f"{said}. Pass --tokenizer with the tokenizer it was trained on, or --accept-tokenizer "
                         f"to sample with this one anyway")
    print(f"warning: {said}; sampling anyway (--accept-tokenizer)", file=sys.stderr)


def default_classes(num_classes):
    """Grid classes: all when <= 16, DiT's eight for ImageNet, else eight spread evenly."""
    if num_classes <= 16:
        return list(range(num_classes))
    if num_classes == 1000:
        return list(IMAGENET_CLASSES)
    return sorted({int(c) for c in np.linspace(0, num_classes - 1, 8).round()})


# --- Sampling (Sec. 4): per-sample seeds, so a sample is the same in any batch and on any rank ------

def sample_seeds(base_seed, indices):
    """One seed per sample index: base_seed * 1000003 + index."""
    return [base_seed * SEED_STRIDE + int(i) for i in indices]


def balanced_labels(n, classes, seed):
    """Labels int64 [n]: the classes in turn (counts differ by at most 1), shuffled by a fixed seeded permutation."""
    labels = np.asarray(classes, np.int64)[np.arange(n) % len(classes)]
    return labels[np.random.default_rng(seed).permutation(n)]  # ADM's IS reads the file in 5k chunks: no sorting


def padded(items, n):
    """items (a list or tensor) with its last item repeated up to n items."""
    pad = max(0, n - len(items))
    if torch.is_tensor(items):
        return torch.cat([items, items[-1:].expand(pad, *items.shape[1:])]) if pad else items
    return list(items) + [items[-1]] * pad


@torch.no_grad()
def generate_batch(generator, classes, seeds, opts, pad_to=0):
    """Codes int64 [B, T] on the CPU for class indices and seeds [B]; opts: generate()'s keywords. Run padded to
    pad_to samples (compiled code sees one shape) and to at least MIN_BATCH (one rounding for every batch size)."""
    n = max(pad_to, MIN_BATCH)
    return generator.generate(padded(classes, n), seeds=padded(seeds, n), **opts)[:len(classes)].cpu()


@torch.no_grad()
def decode(tokenizer, codes):
    """Images float [N, 3, H, W] in [0, 1] on the CPU of codes [N, T], decoded DECODE_BATCH at a time (the last
    batch padded): an image's rounding depends on its index in `codes` modulo DECODE_BATCH only."""
    device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.decode(padded(c.to(device), DECODE_BATCH))[:len(c)].float().cpu()
                      for c in codes.split(DECODE_BATCH)])


def sample_grid(generator, tokenizer, classes, per_class, opts, seed=0, batch_size=32, progress=False):
    """(codes [C * per_class, T], images float [C * per_class, 3, H, W] in [0, 1]): per_class samples of each class
    in turn; sample i has seed seed * 1000003 + i."""
    labels = [c for c in classes for _ in range(per_class)]
    seeds, pad_to = sample_seeds(seed, range(len(labels))), min(batch_size, len(labels))
    codes = torch.cat([generate_batch(generator, labels[i:i + batch_size], seeds[i:i + batch_size], opts, pad_to)
                       for i in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch",
                                     disable=not progress)])
    return codes, decode(tokenizer, codes)


# --- ADM sample batch (npz): a shard file per fixed index range, skipped by a rerun, assembled once --

def open_work_folder(work, settings, rank=0):
    """Create (rank 0) or reuse the shard folder; raise FileExistsError if its shards came from other settings."""
    path = os.path.join(work, "settings.json")
    if rank == 0 and not os.path.isfile(path):
        plumbing.save_json(path, settings)
    plumbing.barrier()
    found = plumbing.read_json(path, "the shard folder's settings", f"delete the folder {work} to start over")
    differ = sorted(k for k, v in found.items() if settings.get(k) != v)
    if differ:
        raise FileExistsError(f"{work} holds shards of another run (it differs in {', '.join(differ)}): rerun "
                              f"with the same settings to resume it, or delete the folder to start over")


def sample_npz(generator, tokenizer, out, n, classes, opts, settings, seed=0, batch_size=32, shard_size=256,
               rank=0, world=1):
    """Write out (ADM npz: arr_0 uint8 [n, H, W, 3] by truncation, arr_1 int64 labels, codes [n, T]); returns the
    number of samples this process made. Labels are balanced over classes and shuffled.

    Shard k holds samples [k * shard_size, (k + 1) * shard_size) in out + ".parts/k.npz"; rank r makes shards
    r, r + world, ... that are not there yet (a rerun resumes), so the file does not depend on the world size.
    """
    work, labels = out + ".parts", balanced_labels(n, classes, seed)
    shard = lambda start: os.path.join(work, f"{start // shard_size:06d}.npz")
    open_work_folder(work, settings, rank)
    todo = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)[rank::world] if not os.path.isfile(shard(s))]
    code_dtype = np.int16 if generator.config.codebook_size <= 2 ** 15 else np.int32
    for s, e in tqdm(todo, desc=f"sampling (rank 0 of {world})", unit="shard", disable=rank != 0):
        codes = torch.cat([generate_batch(generator, labels[i:min(i + batch_size, e)].tolist(),
                                          sample_seeds(seed, range(i, min(i + batch_size, e))), opts,
                                          min(batch_size, n))
                           for i in range(s, e, batch_size)])
        plumbing.save_npz(shard(s), images=plumbing.to_uint8(decode(tokenizer, codes), "truncate"),
                          codes=codes.numpy().astype(code_dtype))
    plumbing.barrier()
    if rank == 0:
        assemble_npz(out, [shard(s) for s in range(0, n, shard_size)], labels, sample_job(settings))
        shutil.rmtree(work)
    plumbing.barrier()
    return sum(e - s for s, e in todo)


def assemble_npz(out, shards, labels, job):
    """Write out from the shard files in order, atomically, with `job` (plumbing.claim) as its "job" entry; fixed
    zip timestamps make equal samples a byte-equal file. arr_0 streams one shard at a time (50k 256 px images are
    9.8 GB). A damaged shard is named, to be made again."""
    entry = lambda name: zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))

    def write(f):
        codes = []
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf:
            with zf.open(entry("arr_0.npy"), "w", force_zip64=True) as arr_0:
                for k, path in enumerate(shards):
                    with plumbing.open_npz(path, "sample shard", "delete it and rerun the same command, which makes "
                                                                 "it again") as part:
                        images = part["images"]
                        codes.append(part["codes"])
                    if k == 0:
                        shape = (len(labels), *images.shape[1:])
                        np.lib.format.write_array_header_1_0(arr_0, dict(descr="|u1", fortran_order=False, shape=shape))
                    arr_0.write(np.ascontiguousarray(images).tobytes())
            for name, array in (("arr_1", labels), ("codes", np.concatenate(codes)), ("job", np.array(json.dumps(job)))):
                with zf.open(entry(f"{name}.npy"), "w", force_zip64=True) as g:
                    np.lib.format.write_array(g, array, allow_pickle=False)
    plumbing.atomic_write(out, write)


# --- Command line -----------------------------------------------------------------------------------

def build_parser():
    """The command line (see the module docstring for examples)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt", metavar="GEN", required=True, help="generator: alitok_{b,l,xl}.bin or a train.py checkpoint")
    add("--tokenizer", metavar="TOK", help="tokenizer: AliTok.pth or a train.py checkpoint (default: the path the "
        "generator checkpoint carries)")
    add("--classes", type=int, nargs="+", metavar="C", help="class indices (grid default: all when <= 16 classes, "
        "DiT's 207 360 387 974 88 979 417 279 for ImageNet; --npz default: all classes)")
    add("--per-class", type=int, default=8, help="grid: samples per class, one row per class (default 8)")
    add("--npz", type=int, metavar="N", help="write an ADM sample batch of N images instead (arr_0 uint8 NHWC by "
        "truncation, arr_1 labels): N / classes per class, shuffled; resumable; runs under torchrun")
    add("--shard-size", type=int, default=256, help="--npz: samples per resumable shard file (default 256)")
    add("--cfg-scale", type=float, help="guidance scale g; 1 = none (default: released B 16, L 6, XL 13)")
    add("--cfg-power", type=float, help="power p of the guidance schedule (default: released B 1.8, L 0.7, XL 1.4)")
    add("--temperature", type=float, default=1.0, help="softmax temperature; 0 = argmax (default 1, as released)")
    add("--top-k", type=int, default=0, help="sample among the k most likely codes; 0 = all (default)")
    add("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off (default)")
    add("--seed", type=int, default=0, help="base seed, 0 to 4294967295: sample i uses seed * 1000003 + i (default 0)")
    add("--batch-size", type=int, help="samples per forward pass and process (default: 32 on a CPU; on a GPU the "
        "largest power of two up to 256 whose KV cache takes at most a quarter of the free memory; fewer than 8 "
        "run padded to 8); the samples do not depend on it")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="fp32 (default; TF32 matmuls on a GPU) is "
        "the paper's evaluation setting. bf16 holds the block weights in bfloat16: faster, samples statistically "
        "the same but not equal, and not the paper's setting")
    add("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the whole sampling step (batches "
        "are padded to --batch-size; CUDA graphs on a GPU). Default: on for CUDA, off on a CPU, where compiling "
        "costs more than it saves for a few hundred images")
    add("--out", help="output file: a grid .png or .jpg (default: out/<ckpt name>_grid.png), or with --npz an .npz "
        "(default out/<ckpt name>_<N>.npz); the settings and speed go beside it as .json")
    add("--overwrite", action="store_true", help="replace --out and its .json record when they hold something else "
        "than this run's samples (a file of another job or program)")
    add("--accept-tokenizer", action="store_true", help="sample even with a tokenizer whose codebook is not the "
        "one the generator checkpoint names (its fingerprint; a warning is printed)")
    return p


def check_args(p, args, world):
    """parser.error (ValueError for --out's name) on combinations of arguments that cannot work, before any model
    is loaded (ranges: FLAG_RULES)."""
    if world > 1 and not args.npz:
        p.error("torchrun (WORLD_SIZE > 1) is for --npz only")
    if args.npz and args.out and not args.out.endswith(".npz"):
        p.error("--out must end in .npz with --npz (evaluators look for it)")
    if not args.npz and args.out and os.path.splitext(args.out)[1].lower() not in plumbing.PICTURE_FORMATS:
        raise ValueError(f"--out {args.out}: a grid is written as {' or '.join(plumbing.PICTURE_FORMATS)} (an .npz "
                         f"sample batch with --npz N): name it so")


def sample_job(keys, per_class=None):
    """What decides a sample file (plumbing.claim): the program, the SHARD_KEYS settings `keys`, and a grid's
    samples per class."""
    return {"program": "sample.py", **keys, "per_class": per_class}


def sampling_settings(args, cfg, classes, tok_source, device, world):
    """Everything that decides or describes a run, for the JSON record (and the shard folder's check). The files'
    "size:mtime" stamps: a checkpoint retrained under the same path must not reuse old samples."""
    file_stamp = lambda path: f"{os.stat(path).st_size}:{os.stat(path).st_mtime_ns}"
    return dict(generator=os.path.abspath(args.ckpt), generator_stamp=file_stamp(args.ckpt), tokenizer=tok_source,
                tokenizer_stamp=file_stamp(tok_source) if os.path.isfile(tok_source) else None, n=args.npz,
                classes=classes, per_class=None if args.npz else args.per_class,
                cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                cfg_power=cfg.cfg_power if args.cfg_power is None else args.cfg_power,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                precision=args.precision, shard_size=args.shard_size if args.npz else None,
                batch_size=args.batch_size, device=str(device), world_size=world, compile=args.compile)


def main(argv=None):
    """Run the command line: the grid or the npz, and the JSON record of its settings and speed beside it."""
    p = build_parser()
    args = p.parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    check_args(p, args, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = plumbing.setup_distributed(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the paper's evaluation ran
    args.compile = device.type == "cuda" if args.compile is None else args.compile
    ckpt = read_weights(args.ckpt, "generator checkpoint")
    generator, tokenizer, tok_source = load_models(args.ckpt, args.tokenizer, device, args.precision,
                                                   args.accept_tokenizer, ckpt)
    names, ckpt = class_names(ckpt), None          # the file's tensors dropped: the generator holds copies
    cfg = generator.config
    args.batch_size = args.batch_size or default_batch(cfg, device, args.precision)
    classes = args.classes or (list(range(cfg.num_classes)) if args.npz else default_classes(cfg.num_classes))
    check_classes(classes, cfg.num_classes)
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    args.out = args.out or (f"out/{stem}_{args.npz}.npz" if args.npz else f"out/{stem}_grid.png")
    record = os.path.splitext(args.out)[0] + ".json"
    settings = json.loads(json.dumps(sampling_settings(args, cfg, classes, tok_source, device, world)))
    settings["class_names"] = [names[c] for c in classes] if names else None   # the released files name none
    keys = {k: settings[k] for k in SHARD_KEYS}
    job = sample_job(keys, settings["per_class"])
    if args.npz and plumbing.job_of(args.out) == job:
        print(f"{args.out} already holds these samples: nothing to do; delete it to redo it")
        return 0
    # rank 0 holds --out while it samples: a second run onto it is refused, naming this process
    with plumbing.RunFolderLock(args.out, args.out + ".lock") if rank == 0 else contextlib.nullcontext():
        if rank == 0:       # the files are this job's, or --overwrite says so; a killed writer's leftovers go
            plumbing.claim(args.out, job, "--out", args.overwrite)
            plumbing.claim(record, job, "the record of --out", args.overwrite)
            plumbing.remove_stale_temporaries(os.path.dirname(os.path.abspath(args.out)),
                                              [os.path.basename(args.out), os.path.basename(record)])
            plumbing.remove_stale_temporaries(args.out + ".parts")
            shown = {"classes": f"{len(classes)}", "class_names": None} if not args.classes else {}
            print("sampling with", json.dumps(dict(settings, **shown)))
        opts = {k: settings[k] for k in ("cfg_scale", "cfg_power", "temperature", "top_k", "top_p")}
        if args.compile:
            opts["step"] = speed.compile_step(generator)
        start = time.perf_counter()
        if args.npz:
            made = sample_npz(generator, tokenizer, args.out, args.npz, classes, opts, keys, args.seed,
                              args.batch_size, args.shard_size, rank, world)
        else:
            _, images = sample_grid(generator, tokenizer, classes, args.per_class, opts, args.seed, args.batch_size,
                                    progress=True)
            made = len(images)
            plumbing.save_grid(images, args.out, nrow=args.per_class, job=job)
        seconds = time.perf_counter() - start
        if plumbing.is_distributed():         # every rank counts: the record is the whole job's
            total = torch.tensor(made)
            dist.all_reduce(total)
            made = int(total)
        rate = made / seconds if made else None
        if rank == 0:
            plumbing.save_json(record, dict(settings=settings, out=os.path.abspath(args.out), images_made=made,
                                            seconds=round(seconds, 3), images_per_s=rate, torch=torch.__version__,
                                            tokens_per_s=rate and rate * cfg.n_tokens,
                                            generator_config=asdict(cfg)), job=job)
            print(f"wrote {args.out} ({made} images made in {seconds:.1f} s"
                  + (f", {rate:.3f} images/s)" if rate else ")"))
    if plumbing.is_distributed():
        plumbing.barrier()                # rank 0's record written, then all ranks leave together
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
