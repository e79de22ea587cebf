"""Speed of AliTok sampling against what the hardware allows: `make bench` (random weights, no files needed).

Prints, in one run: whole generate() calls (all tokens, guidance on: the conditional and unconditional halves
as one doubled batch) in float32 and with bfloat16 weights; the KV cache against the naive baseline that
recomputes the whole prefix at every step; the memory floor (bytes a cached generation must read: every matmul
weight once per step plus the filled keys and values, over the measured bandwidth of a large read) and the FLOP
floor (over the measured matmul rate); the tokenizer's encode and decode against its matmul rate; the FID
Inception's feature extraction as fid.py runs it against the plain network (the baseline); and a memory
column (the process's peak RSS on a CPU, peak CUDA memory on a GPU). On a GPU it also runs the compiled decode
step (static shapes, CUDA graphs) at batch 64 for the B, L and XL shapes.

examples:
  python tools/bench.py                               # B shape, batch 4 with guidance (8 sequences), all 273 tokens
  python tools/bench.py --preset XL --batch 8 --uncached-tokens 16
  python tools/bench.py --device cuda                 # adds the compiled B / L / XL rows at batch 64
"""
import argparse
import copy
import functools
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import numpy as np
import torch

import fid
import inception
import plumbing
import speed
from alitok import Generator, Tokenizer, ffn_hidden, generator_config, tokenizer_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- Floors: bytes and FLOPs a cached generation cannot avoid ---------------------------------------

def matmul_weights(cfg):
    """Weights used in matmuls per token: qkv, proj and SwiGLU of each layer plus the output head (not the lookups)."""
    W = cfg.width
    return cfg.layers * (4 * W * W + 3 * W * ffn_hidden(W)) + W * cfg.codebook_size


def generation_flops(cfg, sequences, n_tokens):
    """FLOPs of cached sampling: per token and sequence 2 * matmul weights plus 4 * width * context per layer
    for attention (QK^T and AV; token s sees s + 1 positions)."""
    return sequences * sum(2 * matmul_weights(cfg) + 4 * cfg.width * cfg.layers * (s + 1) for s in range(n_tokens))


def generation_bytes(cfg, sequences, n_tokens, weight_bytes, cache_bytes):
    """Bytes cached sampling must read at least: the block weights (weight_bytes per value; the output head is
    always float32) once per step, plus the keys and values of the context (s + 1 positions at token s)."""
    head = cfg.width * cfg.codebook_size
    kv = sum(2 * cfg.layers * sequences * (s + 1) * cfg.width for s in range(n_tokens))
    return n_tokens * ((matmul_weights(cfg) - head) * weight_bytes + head * 4) + kv * cache_bytes


def tokenizer_flops(cfg, part):
    """FLOPs of one image through the tokenizer's encoder or decoder: its block matmuls and attention."""
    width, layers = (cfg.enc_width, cfg.enc_layers) if part == "encode" else (cfg.dec_width, cfg.dec_layers)
    tokens = cfg.n_image + cfg.n_tokens if part == "encode" else cfg.n_leading + cfg.n_tokens
    return layers * (2 * 12 * width * width * tokens + 4 * width * tokens ** 2)


# --- Measuring ---------------------------------------------------------------------------------------

def timed(fn, device):
    """Seconds fn() takes, the device synchronised on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@functools.cache
def matmul_rate(device, dtype):
    """Measured matmul throughput in FLOP/s, once per device and dtype: best of 3 square products as nn.Linear
    runs them (x @ w.T: on a CPU without bf16 units a plain bf16 a @ b takes a path over ten times slower), the
    size doubled from 256 until one takes 0.1 s or the size is 8192 on cuda, 2048 on cpu."""
    size, largest = 256, 8192 if device.type == "cuda" else 2048
    while True:
        x, w = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        torch.nn.functional.linear(x, w)
        seconds = min(timed(lambda: torch.nn.functional.linear(x, w), device) for _ in range(3))
        if seconds >= 0.1 or size >= largest:
            return 2 * size ** 3 / seconds
        size *= 2


def read_bandwidth(device):
    """Measured bytes/s of reading one large float32 tensor (a sum): 4 GiB on cuda, 1 GiB on cpu; best of 3."""
    x = torch.ones((4 if device.type == "cuda" else 1) * 2 ** 28, device=device)
    x.sum()
    return 4 * x.numel() / min(timed(lambda: x.sum(), device) for _ in range(3))


def reset_peak(device):
    """Start a new peak-memory window: CUDA's allocator peak, or (Linux) the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device):
    """Peak bytes since reset_peak: CUDA memory allocated, or the process's resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def random_generator(preset, device, precision):
    """A generator of a preset shape with random weights (its zero-initialised head randomised too), through
    speed.for_inference as sample.py runs it."""
    torch.manual_seed(0)
    generator = Generator(generator_config(preset)).eval()
    torch.nn.init.normal_(generator.output.weight, std=0.02)
    return speed.for_inference(generator.to(device), precision)


# --- The rows ----------------------------------------------------------------------------------------

@torch.no_grad()
def generate_row(generator, batch, device, repeat=1, step=None):
    """Seconds and peak memory of generate() for batch classes (all tokens, guidance on), best of repeat; step:
    generate()'s (a compiled one from speed.compile_step)."""
    classes = list(range(batch))
    generator.generate(classes, seeds=classes, step=step)  # warm-up: packed copies, compilation, CUDA graphs
    reset_peak(device)
    seconds = min(timed(lambda: generator.generate(classes, seeds=classes, step=step), device) for _ in range(repeat))
    return dict(seconds=seconds, peak=peak_memory(device))


@torch.no_grad()
def forward_passes(generator, sequences, n_tokens, cached, device):
    """Seconds to run the first n_tokens of `sequences` sequences through the generator: with the KV cache, one
    token per step, or the naive baseline that recomputes the whole prefix at every step."""
    ids = torch.randint(generator.config.codebook_size, (sequences, n_tokens), device=device)

    def work():
        if cached:
            generator.setup_cache(sequences)
            generator.prefill(ids[:, :1])
            for s in range(1, n_tokens):
                generator.decode_one_token(ids[:, s:s + 1], torch.tensor([s], device=device), s + 1)
            generator.free_cache()
        else:
            for s in range(1, n_tokens + 1):
                generator.logits(ids[:, :s])
    return timed(work, device)


@torch.no_grad()
def tokenizer_rows(device, precision, batch, preset="alitok"):
    """{encode, decode: images/s, FLOP/s, peak bytes} of a random-weight tokenizer of a preset shape."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(tokenizer_config(preset, "inference")).eval().to(device)
    tokenizer = speed.for_inference(tokenizer, precision)
    cfg = tokenizer.config
    images = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device=device)
    codes = torch.randint(cfg.codebook_size, (batch, cfg.n_tokens), device=device)
    rows = {}
    for part, fn in (("encode", lambda: tokenizer.encode(images)), ("decode", lambda: tokenizer.decode(codes))):
        fn()
        reset_peak(device)
        seconds = min(timed(fn, device) for _ in range(2))
        rows[part] = dict(images_per_s=batch / seconds, flops_per_s=batch * tokenizer_flops(cfg, part) / seconds,
                          peak=peak_memory(device))
    return rows


def conv_flops(net, x):
    """FLOPs of the first image of x through a network's convolutions and linear layers (two per multiply-add)."""
    total = []
    def count(m, inputs, out):
        per_output = m.weight[0].numel() if isinstance(m, torch.nn.Conv2d) else m.in_features
        total.append(2 * out[0].numel() * per_output)
    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        net(x[:1])
    for hook in hooks:
        hook.remove()
    return sum(total)


def inception_rows(device, precisions, batch):
    """{name: images/s, FLOP/s} of fid.extract (ADM preprocessing of 256x256 uint8 images, then the FID Inception
    with random weights) as fid.py runs it (fold_batchnorm: BatchNorm folded, NHWC on a CPU) in each precision,
    and with the plain network (BatchNorm separate, NCHW; how pytorch-fid runs it): the baseline."""
    torch.manual_seed(0)
    plain = inception.FIDInception().eval()
    for m in plain.modules():        # activations keep their scale through the layers (no denormal slow paths)
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    plain = plain.to(device)
    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    flops = conv_flops(plain, inception.preprocess(torch.from_numpy(images[:1]).to(device)))
    flops += 2 * plain.fc.weight.numel()                              # the logits: pool3 @ fc.weight.T
    nets = {"plain fp32 (baseline)": plain}
    nets |= {f"fid.py {p}": inception.fold_batchnorm(copy.deepcopy(plain), p, device) for p in precisions}
    rows = {}
    for name, net in nets.items():
        run = lambda: fid.extract(net, images, batch_size=batch, progress=False)
        run()
        seconds = min(timed(run, device) for _ in range(2))
        rows[name] = dict(images_per_s=batch / seconds, flops_per_s=batch * flops / seconds)
    return rows


def floor_rows(cfg, batch, precision, device):
    """{memory floor, FLOP floor: seconds} of one cached generation, from the measured bandwidth and matmul rate."""
    sequences, n, dtype = 2 * batch, cfg.n_tokens, DTYPES[precision]
    cache_bytes = 4 if device.type == "cpu" else dtype.itemsize   # speed.cpu_caches: float32 on a CPU
    nbytes = generation_bytes(cfg, sequences, n, dtype.itemsize, cache_bytes)
    flops, bandwidth, rate = generation_flops(cfg, sequences, n), read_bandwidth(device), matmul_rate(device, dtype)
    return {"memory floor": dict(seconds=nbytes / bandwidth,
                                 note=f"{nbytes / 1e9:.1f} GB / {bandwidth / 1e9:.1f} GB/s"),
            "FLOP floor": dict(seconds=flops / rate, note=f"{flops / 1e12:.2f} TFLOP / {rate / 1e12:.2f} TFLOP/s")}


def print_rows(title, rows, batch, n_tokens):
    """One table: seconds, images/s, tokens/s, the ratio to the memory floor and the peak memory per row."""
    print(f"\n{title}\n{'':<40}{'seconds':>9}{'images/s':>10}{'tokens/s':>10}{'/ floor':>9}   peak memory / note")
    floors = {k: v["seconds"] for k, v in rows.items() if "floor" in k}
    for name, row in rows.items():
        floor = floors.get(f"memory floor {name.split()[-1]}") if "floor" not in name else None
        ratio = f"{row['seconds'] / floor:>8.1f}x" if floor else f"{'':>9}"
        extra = f"{row['peak'] / 2 ** 30:.2f} GiB" if "peak" in row else row.get("note", "")
        print(f"{name:<40}{row['seconds']:>9.3f}{batch / row['seconds']:>10.2f}"
              f"{batch * n_tokens / row['seconds']:>10.0f}{ratio}   {extra}")


def cpu_section(args, device):
    """The generate rows (fp32, bf16) with their floors, the KV cache against recomputation, the tokenizer."""
    cfg, batch, memory = generator_config(args.preset), args.batch, "peak RSS" if device.type == "cpu" else "CUDA"
    rows = {}
    for precision in args.precisions:
        generator = random_generator(args.preset, device, precision)
        rows[f"generate(), weights {precision}"] = generate_row(generator, batch, device)
        for name, row in floor_rows(cfg, batch, precision, device).items():
            rows[f"{name} {precision}"] = row
        if precision == "fp32":
            K = min(args.uncached_tokens, cfg.n_tokens)
            cached, uncached = (forward_passes(generator, 2 * batch, K, c, device) for c in (True, False))
        del generator
    params = sum(p.numel() for p in Generator(generator_config(args.preset)).parameters())
    print_rows(f"AliTok-{args.preset} shape, random weights, {params / 1e6:.1f}M params; batch {batch} with guidance "
               f"({2 * batch} sequences), all {cfg.n_tokens} tokens; {device}; memory: {memory}", rows, batch,
               cfg.n_tokens)
    if "fp32" in args.precisions:
        print(f"\nKV cache vs recomputing the prefix every step (the naive baseline), first {K} tokens, fp32, "
              f"model only: cached {cached:.2f} s, uncached {uncached:.2f} s: {uncached / cached:.1f}x "
              f"(the baseline's matmul work grows as K^2: {(cfg.n_tokens + 1) / 2:.0f}x cached's at all tokens)")
    rate = {p: matmul_rate(device, DTYPES[p]) for p in args.precisions}
    preset = "tiny" if args.preset == "tiny" else "alitok"
    print(f"\ntokenizer ({preset} shape, random weights, batch {args.tokenizer_batch}): images/s, and GFLOP/s as a "
          f"share of the measured matmul rate")
    for precision in args.precisions:
        t = tokenizer_rows(device, precision, args.tokenizer_batch, preset)
        print(f"  {precision}: " + "   ".join(
            f"{part} {r['images_per_s']:.2f} images/s, {r['flops_per_s'] / 1e9:.0f} GFLOP/s = "
            f"{r['flops_per_s'] / rate[precision]:.0%} of {rate[precision] / 1e9:.0f}, "
            f"peak {r['peak'] / 2 ** 30:.2f} GiB"
            for part, r in t.items()))
    if args.inception_batch:
        rows = inception_rows(device, args.precisions, args.inception_batch)
        rate.setdefault("fp32", matmul_rate(device, torch.float32))          # the baseline runs in float32
        base = rows["plain fp32 (baseline)"]["images_per_s"]
        print(f"\nFID Inception feature extraction (fid.extract, random weights, batch {args.inception_batch} of "
              f"256x256 images): images/s, GFLOP/s as a share of the matmul rate, and against the baseline")
        for name, r in rows.items():
            precision = "bf16" if name.endswith("bf16") else "fp32"
            print(f"  {name:<22} {r['images_per_s']:6.2f} images/s, {r['flops_per_s'] / 1e9:.0f} GFLOP/s = "
                  f"{r['flops_per_s'] / rate[precision]:.0%} of {rate[precision] / 1e9:.0f}, "
                  f"{r['images_per_s'] / base:.2f}x the baseline")


def gpu_section(args, device):
    """Compiled decode steps (CUDA graphs) at args.gpu_batch: images/s of each shape, static cache first, then
    steps attending over the filled cache rounded up to --gpu-block positions; stops after --gpu-budget s."""
    n, start = args.gpu_batch, time.perf_counter()
    decode_s = {p: n / tokenizer_rows(device, p, n)["decode"]["images_per_s"] for p in args.precisions}
    print(f"\ncompiled decode step, batch {n} with guidance; images/s of generate() and with the tokenizer's "
          f"decode (" + ", ".join(f"{p} {n / s:.0f} images/s" for p, s in decode_s.items()) + ")")
    blocks = (None,) + ((args.gpu_block,) if args.gpu_block else ())        # each row built and compiled once
    runs = [(p, preset, block) for p in args.precisions for preset in args.gpu_presets
            for block in blocks if block is None or (p == "bf16" and preset == args.gpu_presets[0])]
    for precision, preset, block in runs:
        if time.perf_counter() - start > args.gpu_budget:
            print(f"  {preset} {precision} block {block}: skipped (--gpu-budget {args.gpu_budget} s spent)")
            continue
        began, generator = time.perf_counter(), None
        try:
            generator = random_generator(preset, device, precision)
            row = generate_row(generator, n, device, repeat=2, step=speed.compile_step(generator, block))
        except Exception as error:  # one failing shape should not lose the others' numbers
            print(f"  {preset} {precision}: failed: {type(error).__name__}: {str(error)[:400]}", flush=True)
            continue
        finally:
            del generator
            torch.cuda.empty_cache()
        shape = "static cache" if block is None else f"cache rounded up to {block}"
        print(f"  {preset:>2} {precision}, {shape}: {n / row['seconds']:7.1f} images/s ({row['seconds']:.3f} s per "
              f"batch), with decode {n / (row['seconds'] + decode_s[precision]):7.1f}; peak "
              f"{row['peak'] / 2 ** 30:.1f} GiB; compile, warm-up and runs {time.perf_counter() - began:.0f} s",
              flush=True)


FLAG_RULES = {"--batch": "count", "--uncached-tokens": "count", "--tokenizer-batch": "count",
              "--inception-batch": "index", "--gpu-batch": "count", "--gpu-block": "count", "--gpu-budget": "positive"}


def main(argv=None):
    """Run the bench and print its tables."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="B", choices=("tiny", "B", "L", "XL"), help="generator shape (default B)")
    p.add_argument("--batch", type=int, default=4, help="images per batch, doubled by guidance (default 4)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=tuple(DTYPES))
    p.add_argument("--uncached-tokens", type=int, default=24, metavar="K", help="tokens of the naive baseline, "
                   "whose cost grows as K^2 (default 24)")
    p.add_argument("--tokenizer-batch", type=int, default=2, help="images per tokenizer call (default 2)")
    p.add_argument("--inception-batch", type=int, default=16, help="images per FID Inception batch (default 16; "
                   "0 skips it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--gpu-batch", type=int, default=64, help="cuda: batch of the compiled rows (default 64)")
    p.add_argument("--gpu-presets", nargs="*", default=["L", "B", "XL"], help="cuda: shapes of the compiled rows")
    p.add_argument("--gpu-block", type=int, help="cuda: also a bf16 row of the first shape whose compiled steps attend "
                   "over the filled cache rounded up to this many positions (other rows: the whole, static cache)")
    p.add_argument("--gpu-budget", type=float, default=600, help="cuda: seconds after which no compiled row starts")
    args = p.parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 as the paper ran it
    print(f"torch {torch.__version__}, {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda"
          else f", {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} before"))
    if device.type == "cuda":
        gpu_section(args, device)
    cpu_section(args, device)
    if device.type == "cpu":
        print(f"load average {os.getloadavg()[0]:.1f} after (other processes on these cores skew CPU timings)")
    return 0


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
