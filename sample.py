"""Sample from an AliTok generator: an image grid, an ADM sample batch (npz) for FID / IS, or a speed benchmark.

Read beside "AliTok" (arXiv 2506.05289), Sec. 4, and ALITOK_SPEC.md section 2 "Sampling": temperature 1,
no top-k / top-p, power-cosine guidance with each size's released scale g and power p, the conditional and
unconditional halves run as one doubled batch over a KV cache. Sample i draws its randomness from its own
seed, seed * 1000003 + i, so results do not depend on the batch size or the number of processes (bit-exact
on a CPU; on a GPU, kernels chosen per batch shape may round differently and flip a rare draw).

examples:
  # a grid of 8 ImageNet classes (one row each) x 8 samples -> out/alitok_b_grid.png and .json
  python sample.py --ckpt alitok_b.bin --tokenizer AliTok.pth

  # the 50k evaluation batch (50 per class, shuffled) on 8 GPUs; rerun the same line to resume
  torchrun --nproc_per_node=8 sample.py --ckpt alitok_b.bin --tokenizer AliTok.pth --npz 50000 \\
      --out out/alitok_b_50k.npz
  python fid.py VIRTUAL_imagenet256_labeled.npz out/alitok_b_50k.npz --inception pt_inception-2015-12-05-6726825d.pth

  # a generator checkpoint from train.py carries its tokenizer's path: --tokenizer is optional
  python sample.py --ckpt GEN.pt --per-class 4

  # speed of the KV cache against recomputation and against the FLOP floor (random weights, no files)
  python sample.py --bench                      # B shape, batch 8; on a CPU the first 32 tokens only
  python sample.py --bench --bench-preset XL --bench-tokens 273
  OMP_NUM_THREADS=1 python sample.py --bench    # on a CPU whose cores other processes keep busy
"""
import argparse
import json
import os
import re
import resource
import shutil
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from alitok import (GENERATOR_PRESETS, Generator, Tokenizer, ffn_hidden, generator_config, load_generator,
                    load_tokenizer, tokenizer_config)
from data import save_grid, save_npz, setup_distributed

SEED_STRIDE = 1_000_003  # above any sample count: seeds of two base seeds never coincide (N < 1,000,003)
IMAGENET_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py selection (retriever, otter, ...)
RELEASE_NOTE = ("The released weights (generators alitok_b.bin, alitok_l.bin, alitok_xl.bin and the tokenizer "
                "AliTok.pth) come from the AliTok release (arXiv 2506.05289) and are not shipped with this code; "
                "checkpoints of this project come from train.py. Without any file, `python sample.py --bench` "
                "runs on random weights, and the tests run on tiny configs.")
# What decides the samples: shards written under other values must not be mixed into one file.
SHARD_KEYS = ("generator", "generator_stamp", "tokenizer", "tokenizer_stamp", "n", "classes", "seed", "cfg_scale",
              "cfg_power", "temperature", "top_k", "top_p", "precision")


# ----------------------------------------------------------------------------------------------------
# Loading the generator and its tokenizer
# ----------------------------------------------------------------------------------------------------

def missing_file_message(path, what):
    """The error text for a weight file that is not there: what it is, where it comes from, what works without."""
    return f"{what} not found: {path!r}. {RELEASE_NOTE}"


def read_checkpoint(path, what):
    """torch.load a weight file on the CPU, or raise FileNotFoundError with missing_file_message."""
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_file_message(path, what))
    return torch.load(path, map_location="cpu", weights_only=True)


def file_stamp(path):
    """"size:mtime_ns" of a file: a checkpoint retrained under the same path must not reuse old samples."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def carried_tokenizer(ckpt, path):
    """The tokenizer a generator checkpoint carries (train.py writes its path under "tokenizer"), or None."""
    carried = ckpt.get("tokenizer") if isinstance(ckpt, dict) else None
    if isinstance(carried, str) and not os.path.isfile(carried):
        beside = os.path.join(os.path.dirname(path), carried)  # a relative path written from another folder
        carried = beside if os.path.isfile(beside) else carried
    return carried


def load_paired_tokenizer(generator, ckpt, gen_path, tok_arg, device):
    """(tokenizer on device, its source) for a generator: --tokenizer, else the one its checkpoint carries."""
    source = tok_arg or carried_tokenizer(ckpt, gen_path)
    if source is None:
        raise FileNotFoundError(f"no tokenizer: {gen_path!r} carries no tokenizer path, so pass --tokenizer TOK "
                                f"(the released AliTok.pth, or the tokenizer checkpoint the generator was trained "
                                f"on); images cannot be decoded without it. {RELEASE_NOTE}")
    if isinstance(source, str):
        what = "tokenizer" if tok_arg else f"tokenizer (the path carried by {gen_path!r})"
        tokenizer, source = load_tokenizer(read_checkpoint(source, what)), os.path.abspath(source)
    else:
        tokenizer, source = load_tokenizer(source), "embedded in the generator checkpoint"
    g, t = generator.config, tokenizer.config
    if (g.codebook_size, g.n_prefix, g.grid) != (t.codebook_size, t.n_prefix, t.grid):
        raise ValueError(f"generator and tokenizer do not fit: the generator samples {g.n_prefix} + {g.grid}^2 "
                         f"tokens from {g.codebook_size} codes, the tokenizer decodes {t.n_prefix} + {t.grid}^2 "
                         f"from {t.codebook_size}")
    return tokenizer.to(device), source


def default_classes(num_classes):
    """Grid classes: all when <= 16, DiT's eight for ImageNet, else eight spread evenly."""
    if num_classes <= 16:
        return list(range(num_classes))
    if num_classes == 1000:
        return list(IMAGENET_CLASSES)
    return sorted({int(c) for c in np.linspace(0, num_classes - 1, 8).round()})


def check_classes(classes, num_classes):
    """Raise ValueError unless every class index lies in [0, num_classes)."""
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class indices must lie in [0, {num_classes}) for this generator; got {bad[:8]}")


def compile_decode(generator):
    """torch.compile the one-token decode step (shapes stay fixed: batches are padded to --batch-size)."""
    generator.decode_one_token = torch.compile(generator.decode_one_token, dynamic=False)
    return generator


# ----------------------------------------------------------------------------------------------------
# Sampling (Sec. 4): per-sample seeds, so a sample is the same in any batch and on any rank
# ----------------------------------------------------------------------------------------------------

def sample_seeds(base_seed, indices):
    """One seed per sample index: base_seed * 1000003 + index."""
    return [base_seed * SEED_STRIDE + int(i) for i in indices]


def balanced_labels(n, classes, seed):
    """Labels int64 [n]: the classes in turn (counts differ by at most 1), shuffled by a fixed seeded permutation."""
    labels = np.asarray(classes, np.int64)[np.arange(n) % len(classes)]
    return labels[np.random.default_rng(seed).permutation(n)]  # ADM's IS reads the file in 5k chunks: no sorting


def autocast(device, precision):
    """bf16 autocast on device for precision "bf16", a no-op for "fp32"."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def generate_batch(generator, tokenizer, classes, seeds, opts, pad_to=0, precision="fp32"):
    """(codes int64 [B, T], images float [B, 3, H, W] in [0, 1]), on the CPU, for class indices [B] and seeds [B].

    opts: generate()'s cfg_scale, cfg_power, temperature, top_k, top_p. The batch is padded to pad_to samples
    (repeats of the last, dropped again) so that compiled code sees one shape.
    """
    n, pad = len(classes), max(0, pad_to - len(classes))
    classes, seeds = list(classes) + [classes[-1]] * pad, list(seeds) + [seeds[-1]] * pad
    device = generator.output.weight.device
    with autocast(device, precision):
        codes = generator.generate(torch.tensor(classes, device=device), seeds=seeds, **opts)
        images = tokenizer.decode(codes).float()
    return codes[:n].cpu(), images[:n].cpu()


def to_uint8(images):
    """float [B, 3, H, W] in [0, 1] -> uint8 numpy [B, H, W, 3] (rounded, as data.save_grid does)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def sample_grid(generator, tokenizer, classes, per_class, opts, seed=0, batch_size=32, precision="fp32",
                progress=False):
    """(codes [C * per_class, T], images float [C * per_class, 3, H, W] in [0, 1]): per_class samples of each class
    in turn; sample i has seed seed * 1000003 + i."""
    labels = [c for c in classes for _ in range(per_class)]
    seeds = sample_seeds(seed, range(len(labels)))
    pad_to = min(batch_size, len(labels))
    out = [generate_batch(generator, tokenizer, labels[i:i + batch_size], seeds[i:i + batch_size], opts, pad_to,
                          precision)
           for i in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress)]
    return torch.cat([c for c, _ in out]), torch.cat([x for _, x in out])


# ----------------------------------------------------------------------------------------------------
# ADM sample batch (npz): shards per batch, resumable, one process or torchrun
# ----------------------------------------------------------------------------------------------------

SHARD_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")  # a finished shard holds sample indices [start, end)


def distributed():
    """True under an initialised torch.distributed process group (torchrun)."""
    return dist.is_available() and dist.is_initialized()


def barrier():
    """dist.barrier() under torchrun, else nothing."""
    if distributed():
        dist.barrier()


def write_json(path, obj):
    """Write JSON atomically (tmp + os.replace)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def list_shards(work):
    """(start, end, path) of the finished shards in the work folder, sorted by start."""
    found = [(SHARD_NAME.match(name), name) for name in os.listdir(work)]
    return sorted((int(m[1]), int(m[2]), os.path.join(work, name)) for m, name in found if m)


def cover(start, end, shards):
    """Pieces (path, lo, hi) of shards that hold sample indices [start, end) in order, or None if one is missing."""
    pieces, p = [], start
    while p < end:
        best = max((s for s in shards if s[0] <= p < s[1]), key=lambda s: s[1], default=None)
        if best is None:
            return None
        hi = min(best[1], end)
        pieces.append((best[2], p - best[0], hi - best[0]))
        p = hi
    return pieces


def zip_entry(name):
    """A stored zip entry with a fixed timestamp, so that equal arrays make a byte-identical npz."""
    return zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))


def assemble_npz(path, pieces, n):
    """Write the ADM batch from shard pieces in index order, atomically: arr_0 uint8 [n, H, W, 3], arr_1 int64 [n]
    labels, codes int16 [n, T] (the generator's). arr_0 streams one shard at a time (50k 256 px images are 9.8 GB)."""
    labels, codes, tmp = [], [], f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        with zf.open(zip_entry("arr_0.npy"), "w", force_zip64=True) as f:
            for k, (shard, lo, hi) in enumerate(pieces):
                with np.load(shard) as s:
                    images = s["arr_0"][lo:hi]
                    labels.append(s["arr_1"][lo:hi])
                    codes.append(s["codes"][lo:hi])
                if k == 0:
                    header = {"descr": images.dtype.str, "fortran_order": False, "shape": (n, *images.shape[1:])}
                    np.lib.format.write_array_header_1_0(f, header)
                f.write(np.ascontiguousarray(images).tobytes())
        for name, array in (("arr_1", np.concatenate(labels)), ("codes", np.concatenate(codes))):
            with zf.open(zip_entry(f"{name}.npy"), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, array, allow_pickle=False)
    os.replace(tmp, path)


def open_work_folder(work, settings, rank=0):
    """Create (rank 0) or reuse the shard folder; raise FileExistsError if its shards came from other settings."""
    path = os.path.join(work, "settings.json")
    if rank == 0:
        os.makedirs(work, exist_ok=True)
        if not os.path.isfile(path):
            write_json(path, settings)
    barrier()
    with open(path) as f:
        saved = json.load(f)
    differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
    if differ:
        raise FileExistsError(f"{work} holds shards of another run (it differs in {', '.join(differ)}): rerun "
                              f"with the same settings to resume it, or delete the folder to start over")


def shard_settings(settings):
    """The settings that decide the samples (SHARD_KEYS), as JSON reads them back."""
    return json.loads(json.dumps({k: (settings or {}).get(k) for k in SHARD_KEYS}))


def recorded_settings(record):
    """shard_settings of the JSON record written beside a finished npz, or None."""
    if not (record and os.path.isfile(record)):
        return None
    with open(record) as f:
        return shard_settings(json.load(f).get("settings"))


def sample_npz(generator, tokenizer, out, n, classes, opts, seed=0, batch_size=32, precision="fp32",
               settings=None, rank=0, world=1, record=None):
    """Write out (ADM npz) with n samples, labels balanced over classes and shuffled; returns (images made, s),
    or None when out and its JSON record already hold these settings' samples (a rerun of a finished line).

    Batches are index ranges [k * batch_size, ...); rank r makes batches k = r, r + world, ... and writes each
    to a shard in out + ".parts", skipping those already there (a rerun resumes). Rank 0 then assembles out.
    """
    work, keys = out + ".parts", shard_settings(settings)
    finished = not os.path.isdir(work) and os.path.isfile(out) and recorded_settings(record) == keys
    barrier()  # every rank looks before rank 0 creates the work folder
    if finished:
        return None
    open_work_folder(work, keys, rank)
    labels, done = balanced_labels(n, classes, seed), list_shards(work)
    batches = [(s, min(s + batch_size, n)) for s in range(rank * batch_size, n, world * batch_size)]
    todo = [(s, e) for s, e in batches if cover(s, e, done) is None]
    device = generator.output.weight.device
    code_dtype = np.int16 if generator.config.codebook_size <= 2 ** 15 else np.int32
    start = time.perf_counter()
    for s, e in tqdm(todo, desc=f"sampling (rank 0 of {world})", unit="batch", disable=rank != 0):
        codes, images = generate_batch(generator, tokenizer, labels[s:e].tolist(), sample_seeds(seed, range(s, e)),
                                       opts, min(batch_size, n), precision)
        save_npz(os.path.join(work, f"{s:09d}-{e:09d}.npz"), arr_0=to_uint8(images), arr_1=labels[s:e],
                        codes=codes.numpy().astype(code_dtype))
    made = torch.tensor(float(sum(e - s for s, e in todo)), device=device)
    if distributed():
        dist.all_reduce(made)
    seconds = time.perf_counter() - start
    if rank == 0:
        pieces = cover(0, n, list_shards(work))
        assert pieces is not None, f"{work}: shards are missing after every rank finished"
        assemble_npz(out, pieces, n)
        with np.load(out) as f:  # the shards carry their labels: check they are this run's
            assert np.array_equal(f["arr_1"], labels), f"{work}: shard labels differ from this run's"
        shutil.rmtree(work)
    barrier()
    return int(made.item()), seconds


# ----------------------------------------------------------------------------------------------------
# Benchmark: KV cache vs recomputation vs the FLOP floor, and tokenizer decoding (random weights)
# ----------------------------------------------------------------------------------------------------

def matmul_weights(cfg):
    """Weights used in matmuls per token: qkv, proj and SwiGLU of each layer plus the output head (not the lookups)."""
    W = cfg.width
    return cfg.layers * (4 * W * W + 3 * W * ffn_hidden(W)) + W * cfg.codebook_size


def generation_flops(cfg, sequences, n_tokens):
    """FLOPs of cached sampling of the first n_tokens: per token and sequence 2 * matmul weights plus
    4 * width * context per layer for attention (QK^T and AV; token s sees s + 1 positions)."""
    per_sequence = sum(2 * matmul_weights(cfg) + 4 * cfg.width * cfg.layers * (s + 1) for s in range(n_tokens))
    return sequences * per_sequence


def generation_bytes(cfg, sequences, n_tokens, value_bytes):
    """Bytes cached sampling of the first n_tokens must read at least: every matmul weight once per step, plus
    the keys and values of the context (s + 1 positions per layer and sequence at token s)."""
    kv = sum(2 * cfg.layers * sequences * (s + 1) * cfg.width for s in range(n_tokens))
    return value_bytes * (n_tokens * matmul_weights(cfg) + kv)


def sync(device):
    """Wait for queued CUDA work (timing), a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds fn() takes, the device synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_rate(device, dtype, size=None):
    """Measured matmul throughput in FLOP/s: best of 3 size x size products (8192 on cuda, 2048 on cpu)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * size ** 3 / min(timed(lambda: a @ b, device) for _ in range(3))


def copy_bandwidth(device, mib=None):
    """Measured memory bandwidth in bytes/s (read + write): best of 3 copies of 1 GiB on cuda, 256 MiB on cpu."""
    n = (mib or (1024 if device.type == "cuda" else 256)) * 2 ** 18        # float32 values
    a, b = torch.ones(n, device=device), torch.empty(n, device=device)
    b.copy_(a)
    return 8 * n / min(timed(lambda: b.copy_(a), device) for _ in range(3))


def peak_memory(device):
    """Peak bytes: the CUDA allocator's since the last reset, or on the CPU the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


@torch.no_grad()
def bench_generation(generator, batch, n_tokens, device, precision):
    """{path: seconds, images/s, tokens/s, peak bytes} for sampling n_tokens with and without the KV cache."""
    classes = torch.arange(batch, device=device) % generator.config.num_classes
    rows = {}
    for name, use_cache in (("uncached", False), ("cached", True)):
        run = lambda k: generator.generate(classes, generator=torch.Generator().manual_seed(0),
                                           use_cache=use_cache, max_tokens=k)
        with autocast(device, precision):
            run(min(n_tokens, 4))                                            # warm-up (and compilation)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(lambda: run(n_tokens), device)
        rows[name] = dict(seconds=seconds, images_per_s=batch / seconds, tokens_per_s=batch * n_tokens / seconds,
                          peak_bytes=peak_memory(device))
    return rows


@torch.no_grad()
def bench_decode(preset, batch, device, precision):
    """Tokenizer decode images/s of a random-weight tokenizer at the inference shape of preset."""
    tokenizer = Tokenizer(tokenizer_config(preset, "inference")).to(device).eval()
    cfg = tokenizer.config
    codes = torch.randint(cfg.codebook_size, (batch, cfg.n_tokens), device=device)
    with autocast(device, precision):
        tokenizer.decode(codes[:1])                                          # warm-up
        return batch / timed(lambda: tokenizer.decode(codes), device)


def floor_rows(cfg, batch, n_tokens, device, dtype):
    """The two floors of cached sampling: FLOPs / measured matmul rate, and bytes read / measured copy bandwidth."""
    flops, rate = generation_flops(cfg, 2 * batch, n_tokens), matmul_rate(device, dtype)
    nbytes, bandwidth = generation_bytes(cfg, 2 * batch, n_tokens, dtype.itemsize), copy_bandwidth(device)
    rows = {}
    for name, seconds in (("floor", flops / rate), ("memory floor", nbytes / bandwidth)):
        rows[name] = dict(seconds=seconds, images_per_s=batch / seconds, tokens_per_s=batch * n_tokens / seconds)
    return rows, dict(flops=flops, matmul_flops_per_s=rate, bytes=nbytes, bytes_per_s=bandwidth)


def bench(preset="B", batch=8, n_tokens=None, device=torch.device("cpu"), precision="fp32", compile=False):
    """Time a random-weight generator of a preset shape at batch with CFG; the numbers print_bench shows (dict)."""
    torch.manual_seed(0)
    cfg = generator_config(preset)
    generator = Generator(cfg).to(device).eval()
    torch.nn.init.normal_(generator.output.weight, std=0.02)  # zero at init: sampling would be uniform
    if compile:
        compile_decode(generator)
    n_tokens = min(n_tokens or (cfg.n_tokens if device.type == "cuda" else 32), cfg.n_tokens)
    rows = bench_generation(generator, batch, n_tokens, device, precision)
    params = sum(p.numel() for p in generator.parameters())
    del generator
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    floors, measured = floor_rows(cfg, batch, n_tokens, device, dtype)
    rows.update(floors)
    tok_preset = "tiny" if preset == "tiny" else "alitok"
    decode_batch = batch if device.type == "cuda" else min(batch, 2)         # the released decoder is slow on a CPU
    cached = rows["cached"]["seconds"]
    return dict(preset=preset, params=params, batch=batch, n_tokens=n_tokens, all_tokens=cfg.n_tokens,
                device=str(device), precision=precision, compile=compile, threads=torch.get_num_threads(),
                load_average=os.getloadavg()[0], dtype=str(dtype).replace("torch.", ""),
                matmul_weights=matmul_weights(cfg), rows=rows, **measured,
                speedup=rows["uncached"]["seconds"] / cached, floor_ratio=cached / rows["floor"]["seconds"],
                memory_floor_ratio=cached / rows["memory floor"]["seconds"], tokenizer=tok_preset,
                decode_batch=decode_batch,
                decode_images_per_s=bench_decode(tok_preset, decode_batch, device, precision))


def print_bench(r):
    """Print bench()'s numbers as a table with the targets."""
    K, T = r["n_tokens"], r["all_tokens"]
    print(f"\nAliTok-{r['preset']} generator shape, random weights, {r['params'] / 1e6:.1f}M params; batch "
          f"{r['batch']} with CFG ({2 * r['batch']} sequences); {r['device']}, {r['precision']}"
          f"{', compiled decode step' if r['compile'] else ''}")
    if r["device"] == "cpu":  # on a shared CPU every parallel region waits for busy cores: small ops suffer most
        print(f"cpu threads: {r['threads']}; load average {r['load_average']:.1f} (other processes skew the "
              f"numbers; OMP_NUM_THREADS=1 helps when all cores are busy)")
    if K < T:
        print(f"timed: the first K = {K} of {T} tokens (--bench-tokens K). The uncached path recomputes the whole "
              f"prefix at every step (cost ~ K^2), so the cached / uncached ratio grows with K: at K = {K} uncached "
              f"does (K + 1) / 2 = {(K + 1) / 2:.1f}x the matmul FLOPs of cached, at K = {T} {(T + 1) / 2:.0f}x.")
    else:
        print(f"timed: all K = {T} tokens of an image")
    print(f"\n{'path':<34}{'seconds':>9}{'images/s*':>11}{'tokens/s':>10}   peak memory")
    names = {"uncached": "uncached (recompute every step)", "cached": "cached (KV cache)",
             "floor": "floor (FLOPs / matmul rate)", "memory floor": "memory floor (bytes / bandwidth)"}
    for key, row in r["rows"].items():
        peak = f"{row['peak_bytes'] / 2 ** 30:.2f} GiB" if "peak_bytes" in row else ""
        peak += " (process peak RSS)" if peak and r["device"] == "cpu" else ""
        print(f"{names[key]:<34}{row['seconds']:>9.3f}{row['images_per_s']:>11.3f}{row['tokens_per_s']:>10.1f}   "
              f"{peak}")
    print(f"* sequences of K = {K} tokens per second" + (" (images/s when K = all tokens)" if K < T else ""))
    print(f"\nfloor: {r['flops'] / 1e9:.1f} GFLOP (per token and sequence: 2 x {r['matmul_weights'] / 1e6:.1f}M "
          f"matmul weights + 4 x width x context per layer) at {r['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
          f"(measured {r['dtype']} torch.matmul)")
    print(f"memory floor: {r['bytes'] / 1e9:.2f} GB (matmul weights once per step + the context's keys and values, "
          f"{r['dtype']}) at {r['bytes_per_s'] / 1e9:.1f} GB/s (measured copy); cached / memory floor "
          f"{r['memory_floor_ratio']:.1f}x")
    print(f"\n{'check':<34}{'value':>9}   target")
    for label, value, target, ok in (("cached speed-up over uncached", r["speedup"], ">= 20x", r["speedup"] >= 20),
                                     ("cached time / floor", r["floor_ratio"], "<= 2x", r["floor_ratio"] <= 2)):
        print(f"{label:<34}{value:>8.1f}x   {target:<8}{'met' if ok else 'NOT MET'}")
    print(f"\ntokenizer decode ({r['tokenizer']} inference shape, random weights, batch {r['decode_batch']}): "
          f"{r['decode_images_per_s']:.3f} images/s")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def build_parser():
    """The command line (see the module docstring for examples)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", metavar="GEN", help="generator: the released alitok_{b,l,xl}.bin or a train.py checkpoint")
    p.add_argument("--tokenizer", metavar="TOK", help="tokenizer: the released AliTok.pth or a train.py checkpoint "
                   "(default: the tokenizer path the generator checkpoint carries)")
    p.add_argument("--classes", type=int, nargs="+", metavar="C", help="class indices (grid default: all when <= 16 "
                   "classes, else 207 360 387 974 88 979 417 279 for ImageNet; --npz default: all classes)")
    p.add_argument("--per-class", type=int, default=8, help="grid: samples per class, one row per class (default 8)")
    p.add_argument("--npz", type=int, metavar="N", help="write an ADM sample batch of N images instead (arr_0 uint8 "
                   "NHWC, arr_1 labels): N / classes per class, shuffled; resumable; runs under torchrun")
    p.add_argument("--cfg-scale", type=float, help="guidance scale g; 1 = none (default: the checkpoint's released "
                   "value: B 16, L 6, XL 13)")
    p.add_argument("--cfg-power", type=float, help="power p of the power-cosine guidance schedule (default: the "
                   "checkpoint's released value: B 1.8, L 0.7, XL 1.4)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature; 0 = argmax (default 1, as released)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely codes; 0 = all (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass in (0, 1]; 1 = off (default)")
    p.add_argument("--seed", type=int, default=0, help="base seed: sample i uses seed * 1000003 + i (default 0)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass and process (default 32)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="bf16 autocast or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the one-token decode step (batches are "
                   "padded to --batch-size so its shapes never change)")
    p.add_argument("--out", help="output file (default: out/<ckpt name>_grid.png, or out/<ckpt name>_<N>.npz with "
                   "--npz); the settings and speed go beside it as .json")
    b = p.add_argument_group("benchmark (random weights: no files needed; `make bench`)")
    b.add_argument("--bench", action="store_true", help="time sampling with and without the KV cache against the "
                   "FLOP floor, and tokenizer decoding; print a table")
    b.add_argument("--bench-preset", choices=tuple(GENERATOR_PRESETS), default="B", help="generator shape (default B)")
    b.add_argument("--bench-batch", type=int, default=8, help="images per batch, doubled by CFG (default 8)")
    b.add_argument("--bench-tokens", type=int, metavar="K", help="time the first K tokens (default: all on cuda, "
                   "32 on cpu, where recomputing all 273 takes far too long)")
    return p


def check_args(p, args, world):
    """parser.error on arguments that cannot work, before any model is loaded."""
    if world > 1 and not args.npz:
        p.error("torchrun (WORLD_SIZE > 1) is for --npz only")
    if args.bench:
        return
    if not args.ckpt:
        p.error(f"--ckpt GEN is required (or use --bench). {RELEASE_NOTE}")
    for name, ok in (("--per-class", args.per_class >= 1), ("--batch-size", args.batch_size >= 1),
                     ("--npz", args.npz is None or args.npz >= 1), ("--temperature", args.temperature >= 0),
                     ("--seed", args.seed >= 0),
                     ("--top-k", args.top_k >= 0), ("--top-p", 0 < args.top_p <= 1)):
        if not ok:
            p.error(f"{name} is out of range (see --help)")
    if args.npz and args.out and not args.out.endswith(".npz"):
        p.error("--out must end in .npz with --npz (evaluators look for it)")


def sampling_settings(args, cfg, classes, tok_source, precision, device, world):
    """Everything that decides or describes a run, for the JSON record (and the shard folder's check)."""
    return dict(generator=os.path.abspath(args.ckpt), generator_stamp=file_stamp(args.ckpt), tokenizer=tok_source,
                tokenizer_stamp=file_stamp(tok_source) if os.path.isfile(tok_source) else None, n=args.npz,
                classes=classes, per_class=None if args.npz else args.per_class,
                cfg_scale=cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale,
                cfg_power=cfg.cfg_power if args.cfg_power is None else args.cfg_power,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                precision=precision, batch_size=args.batch_size, device=str(device), world_size=world,
                compile=args.compile)


def run_sampling(args, generator, tokenizer, settings, rank, world, record):
    """Make the grid (PNG) or the npz; returns the result dict that goes into the JSON record (None: done before)."""
    opts = {k: settings[k] for k in ("cfg_scale", "cfg_power", "temperature", "top_k", "top_p")}
    common = dict(seed=args.seed, batch_size=args.batch_size, precision=settings["precision"])
    if args.npz:
        done = sample_npz(generator, tokenizer, args.out, args.npz, settings["classes"], opts, settings=settings,
                          rank=rank, world=world, record=record, **common)
        if done is None:
            return None
        made, seconds = done
    else:
        start = time.perf_counter()
        _, images = sample_grid(generator, tokenizer, settings["classes"], args.per_class, opts, progress=True,
                                **common)
        seconds, made = time.perf_counter() - start, len(images)
        save_grid(images, args.out, nrow=args.per_class)
    rate = made / seconds if made else None
    return dict(settings=settings, out=os.path.abspath(args.out), images_made=made, seconds=round(seconds, 3),
                images_per_s=rate, tokens_per_s=rate and rate * generator.config.n_tokens, torch=torch.__version__)


def main(argv=None):
    """Run the command line; returns the result dict (bench numbers, or settings and speed of the samples)."""
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args, int(os.environ.get("WORLD_SIZE", 1)))
    rank, world, device = setup_distributed(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.bench:
        result = bench(args.bench_preset, args.bench_batch, args.bench_tokens, device, precision, args.compile)
        print_bench(result)
        return result
    try:
        ckpt = read_checkpoint(args.ckpt, "generator checkpoint")
        generator = load_generator(ckpt).to(device)
        cfg = generator.config
        classes = args.classes or (list(range(cfg.num_classes)) if args.npz else default_classes(cfg.num_classes))
        check_classes(classes, cfg.num_classes)                  # before the tokenizer and any sampling
        tokenizer, tok_source = load_paired_tokenizer(generator, ckpt, args.ckpt, args.tokenizer, device)
        del ckpt
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    if args.compile:
        compile_decode(generator)
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    args.out = args.out or (f"out/{stem}_{args.npz}.npz" if args.npz else f"out/{stem}_grid.png")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = os.path.splitext(args.out)[0] + ".json"
    settings = sampling_settings(args, cfg, classes, tok_source, precision, device, world)
    if rank == 0:
        shown = dict(settings, classes=f"all {len(classes)}" if args.npz and not args.classes else classes)
        print("sampling with", json.dumps(shown))
    try:
        result = run_sampling(args, generator, tokenizer, settings, rank, world, record)
    except FileExistsError as e:  # a work folder of another run
        p.error(str(e))
    if result is None:
        if rank == 0:
            print(f"{args.out} already holds these samples ({record}): nothing to do; delete it to sample again")
        with open(record) as f:
            result = json.load(f)
    elif rank == 0:
        write_json(record, result)
        speed = (f"{result['images_per_s']:.3f} images/s, {result['tokens_per_s']:.1f} tokens/s"
                 if result["images_per_s"] else "nothing left to sample (all shards were there)")
        print(f"wrote {args.out} ({result['images_made']} images made in {result['seconds']:.1f} s: {speed})")
    if distributed():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
