"""Training: tokenizer stage 1 (causal decoder), stage 2 (bidirectional decoder), and the generator.

    python train.py --stage 1                       # tiny tokenizer on the built-in shapes, 2 CPU cores, minutes
    python train.py --stage 2                       # fresh bidirectional decoder on the frozen stage-1 codes
    python train.py --stage ar                      # tiny generator on ten-crop pre-tokenized codes
    torchrun --nproc_per_node=8 train.py --stage 1 --preset alitok --data /imagenet/train ...

Defaults come from RECIPES by preset: `alitok` / `B` / `L` / `XL` are the paper's settings, `tiny` is ours.
One file holds model, optimizer(s), discriminator, step, RNG states and config; it is written atomically
and `--resume` continues bit for bit (the data order and augmentations are functions of (seed, step)).
"""
import argparse
import functools
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import alitok
import data
import perceptual

# Per-preset defaults. Tokenizer: the spec gives AdamW lr 1e-4, 10k warm-up, decay to 2e-6, LPIPS early and
# GAN late; batch and length are not given for the released run, so ours are stated as such in the README.
# Generator: AdamW 4e-4, betas (0.9, 0.96), wd 0.03, global batch 2048, 62.5k warm-up, cosine to 1e-5.
RECIPES = {
    "alitok": dict(batch_size=256, steps=500_000, lr=1e-4, lr_min=2e-6, warmup=10_000, lpips_until=100_000,
                   gan_start=400_000, log_every=100, image_every=5_000, ckpt_every=5_000),
    "tiny": dict(batch_size=32, steps=1500, lr=1e-3, lr_min=1e-4, warmup=100, lpips_until=0, gan_start=-1,
                 log_every=25, image_every=250, ckpt_every=250),
    "B": dict(batch_size=2048, steps=500_000, lr=4e-4, lr_min=1e-5, warmup=62_500, log_every=100,
              image_every=10_000, ckpt_every=5_000),
    "L": dict(batch_size=2048, steps=500_000, lr=4e-4, lr_min=1e-5, warmup=62_500, log_every=100,
              image_every=10_000, ckpt_every=5_000),
    "XL": dict(batch_size=2048, steps=250_000, lr=4e-4, lr_min=1e-5, warmup=62_500, log_every=100,
               image_every=10_000, ckpt_every=5_000),
    "tiny-ar": dict(batch_size=64, steps=600, lr=1e-3, lr_min=1e-5, warmup=50, log_every=25,
                    image_every=300, ckpt_every=100),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=["1", "2", "ar"], help="what to train")
    p.add_argument("--preset", default="tiny", help="tokenizer preset: tiny | alitok (default: tiny)")
    p.add_argument("--gen-preset", default=None, help="generator preset: tiny | B | L | XL (default: tiny)")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in), an ImageNet-layout folder, or an npz")
    p.add_argument("--n-images", type=int, default=None, help="use this many images of the source")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="abort if more than this fraction of a folder's images is unreadable")
    p.add_argument("--out", default=None, help="run folder (default: runs/stage1, runs/stage2, runs/ar)")
    p.add_argument("--init", default=None, help="stage 2: the stage-1 checkpoint (default: runs/stage1/ckpt.pt)")
    p.add_argument("--tokenizer", default=None, help="stage ar: tokenizer checkpoint (default: runs/stage2/tokenizer.pt)")
    p.add_argument("--codes", default=None, help="stage ar: pre-tokenized codes npz, made if missing "
                                                   "(default: <out>/codes.npz)")
    p.add_argument("--on-the-fly", action="store_true", help="stage ar: encode images each step, no ten-crop cache")
    g = p.add_argument_group("schedule (defaults from RECIPES[preset])")
    for name, kind in [("batch-size", int), ("steps", int), ("lr", float), ("lr-min", float), ("warmup", int),
                       ("lpips-until", int), ("gan-start", int), ("log-every", int), ("image-every", int),
                       ("ckpt-every", int)]:
        g.add_argument(f"--{name}", type=kind, default=None)
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW wd (tokenizer 1e-4, generator 0.03)")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    l = p.add_argument_group("tokenizer losses")
    l.add_argument("--perceptual-weights", default=None, help="torchvision convnext_small-0c510722.pth")
    l.add_argument("--lpips-weights", nargs=2, default=None, metavar=("VGG16", "LIN"),
                   help="torchvision vgg16-397923af.pth and LPIPS v0.1 vgg.pth")
    l.add_argument("--aux-weight", type=float, default=10.0, help="aux prefix loss weight (times n_prefix/n_image)")
    l.add_argument("--disc-weight", type=float, default=0.1, help="discriminator hinge loss weight")
    l.add_argument("--gan-weight", type=float, default=0.1 * 0.05, help="generator adversarial loss weight")
    a = p.add_argument_group("ablations (stage 1)")
    a.add_argument("--decoder", choices=["causal", "bidirectional"], default="causal",
                   help="stage-1 decoder attention; bidirectional is the paper's baseline tokenizer")
    a.add_argument("--no-prefix", action="store_true", help="no prefix tokens (and so no aux head)")
    a.add_argument("--no-aux", action="store_true", help="no auxiliary prefix loss")
    r = p.add_argument_group("generator regularisation")
    r.add_argument("--dropout", type=float, default=None, help="attention/FFN/residual dropout (0.1)")
    r.add_argument("--token-dropout", type=float, default=None, help="input embedding dropout (0.1)")
    r.add_argument("--class-dropout", type=float, default=None, help="null-class probability (0.1)")
    s = p.add_argument_group("system")
    s.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    s.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after this many steps of this run (time-limited jobs)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    s.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    s.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    return fill_defaults(args)


def fill_defaults(args):
    """Fill unset schedule flags from the preset's recipe and default paths from the stage."""
    tokenizer_stage = args.stage in ("1", "2")
    args.gen_preset = args.gen_preset or ("tiny" if args.preset == "tiny" else "B")
    recipe_name = args.preset if tokenizer_stage else ("tiny-ar" if args.gen_preset == "tiny" else args.gen_preset)
    for key, value in RECIPES[recipe_name].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("lpips_until", "gan_start"):
        if getattr(args, key) is None:
            setattr(args, key, -1)
    if args.weight_decay is None:
        args.weight_decay = 1e-4 if tokenizer_stage else 0.03
    args.out = args.out or os.path.join("runs", {"1": "stage1", "2": "stage2", "ar": "ar"}[args.stage])
    args.init = args.init or os.path.join("runs", "stage1", "ckpt.pt")
    args.tokenizer = args.tokenizer or os.path.join("runs", "stage2", "tokenizer.pt")
    args.codes = args.codes or os.path.join(args.out, "codes.npz")
    return args


# ----------------------------------------------------------------------------------------------------
# Pure pieces: learning rate, data order, augmentation, parameter groups
# ----------------------------------------------------------------------------------------------------

def lr_at(step, base, warmup, total, lr_min):
    """Linear warm-up over `warmup` steps, then cosine from base to lr_min at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr_min + (base - lr_min) * 0.5 * (1 + math.cos(math.pi * t))


def step_generator(seed, step, stream):
    """A torch.Generator for one (seed, step, stream): randomness that resume reproduces exactly."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n, seed, epoch):
    return torch.randperm(n, generator=step_generator(seed, epoch, 0))


def global_batch_indices(n, global_batch, seed, step):
    """Dataset indices [global_batch] of a step: epoch permutations, drop last, one epoch after another."""
    per_epoch = n // global_batch
    assert per_epoch > 0, f"dataset of {n} items is smaller than the global batch {global_batch}"
    epoch, j = divmod(step, per_epoch)
    return epoch_permutation(n, seed, epoch)[j * global_batch:(j + 1) * global_batch]


class StepBatches(torch.utils.data.Sampler):
    """This rank's share of each step's global batch, steps start..stop-1 (DistributedSampler by step)."""

    def __init__(self, n, global_batch, seed, start, stop, rank, world):
        self.n, self.gb, self.seed, self.start, self.stop = n, global_batch, seed, start, stop
        self.share = slice(rank * global_batch // world, (rank + 1) * global_batch // world)

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield global_batch_indices(self.n, self.gb, self.seed, step)[self.share].tolist()

    def __len__(self):
        return self.stop - self.start


def random_flip(images, seed, step, share):
    """Mirror each image of this rank's share with probability 1/2, decided per global batch position."""
    flips = torch.rand(share.stop, generator=step_generator(seed, step, 1))[share] < 0.5
    return torch.where(flips.to(images.device)[:, None, None, None], images.flip(-1), images)


def ar_param_groups(model, weight_decay):
    """AdamW groups: decay on matrices only (no decay on norms, biases and embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def codebook_metrics(counts):
    """Fraction of codes used and perplexity exp(H) of a histogram of code counts."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


# ----------------------------------------------------------------------------------------------------
# Processes, checkpoints, logs
# ----------------------------------------------------------------------------------------------------

def rng_state():
    """The torch RNG states (dropout, class dropout); data order and augmentations need none."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states(world):
    """Every rank's RNG state, gathered to all ranks (dropout streams differ per rank)."""
    if world == 1:
        return [rng_state()]
    out = [None] * world
    dist.all_gather_object(out, rng_state())
    return out


class Logger:
    """Rank-0 JSON-lines metrics and messages."""

    def __init__(self, out, rank):
        self.rank, self.path = rank, os.path.join(out, "metrics.jsonl")

    def info(self, msg):
        if self.rank == 0:
            tqdm.write(msg)

    def metrics(self, record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------------------
# Models of each stage
# ----------------------------------------------------------------------------------------------------

def stage1_tokenizer(args):
    """The stage-1 tokenizer with the requested ablations (decoder attention, prefix, aux loss)."""
    kw = dict(causal=args.decoder == "causal")
    if args.no_prefix:
        kw.update(n_prefix=0, aux_head=False)
    if args.no_aux:
        kw.update(aux_head=False)
    return alitok.Tokenizer(alitok.tokenizer_config(args.preset, 1, **kw))


def stage2_tokenizer(args, log):
    """A fresh bidirectional decoder on the stage-1 encoder, latent tokens and codebook (frozen)."""
    if not os.path.exists(args.init):
        sys.exit(f"stage 2 needs the stage-1 checkpoint {args.init} (train it with `python train.py --stage 1`"
                 f" or pass --init PATH)")
    first = alitok.load_tokenizer(args.init)
    preset = alitok.TOKENIZER_PRESETS.get(args.preset, first.config)
    cfg = replace(first.config, causal=False, aux_head=False, track_usage=True, n_buffer=preset.n_buffer)
    tok = alitok.Tokenizer(cfg)
    state = tok.state_dict()
    frozen = {k: v for k, v in first.state_dict().items() if k.split(".")[0] in FROZEN}
    state.update(frozen)
    alitok.load_strict(tok, state)
    for name, p in tok.named_parameters():
        p.requires_grad_(name.split(".")[0] not in FROZEN)
    log.info(f"stage 2: loaded and froze {len(frozen)} tensors (encoder, latent_tokens, quantize) from {args.init}")
    return tok


FROZEN = ("encoder", "latent_tokens", "quantize")


def export_inference(tok, path):
    """Write the stage-2 tokenizer in the released inference layout (no embed_prob) as our checkpoint."""
    cfg = replace(tok.config, track_usage=False)
    state = {k: v for k, v in tok.state_dict().items() if k != "quantize.embed_prob"}
    data.save_checkpoint({"config": asdict(cfg), "model": state}, path)


def loss_networks(args, device, log):
    """ConvNeXt-S and LPIPS from the files given; a network whose file is not given is switched off."""
    convnext = lp = None
    if args.perceptual_weights:
        convnext = perceptual.load_convnext(args.perceptual_weights).to(device)
    else:
        log.info("perceptual (ConvNeXt-S) loss off: pass --perceptual-weights convnext_small-0c510722.pth to use it")
    if args.lpips_weights:
        lp = perceptual.load_lpips(*args.lpips_weights).to(device)
    else:
        log.info("LPIPS loss off: pass --lpips-weights vgg16-397923af.pth vgg.pth to use it")
    return convnext, lp


def tokenizer_loss(args, cfg, out, x, step, nets):
    """Reconstruction (+ aux) + quantizer (stage 1) + perceptual/LPIPS by phase; returns (loss, parts)."""
    convnext, lp = nets
    parts = {"rec": alitok.reconstruction_loss(x, out, cfg.patch_size, cfg.n_prefix, args.aux_weight)}
    if args.stage == "1":
        parts["vq"] = out["vq_loss"]
    early = step < args.lpips_until                    # LPIPS early avoids blank or noisy reconstructions
    if convnext is not None:
        parts["perc"] = (0.1 if early and lp is not None else 1.0) * perceptual.perceptual_loss(convnext, out["recon"], x)
    if lp is not None and early:
        parts["lpips"] = perceptual.lpips(lp, out["recon"], x)
    return sum(parts.values()), parts


# ----------------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------------

def main(args):
    rank, world, device = data.setup_distributed(args.device)
    log = Logger(args.out, rank)
    os.makedirs(args.out, exist_ok=True)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.autocast("cuda", torch.bfloat16) if precision == "bf16" else nullcontext()
    torch.manual_seed(args.seed + rank)
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} (global) must divide by {world} processes"
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)

    # Models and optimizers.
    tokenizer_stage = args.stage in ("1", "2")
    disc = disc_opt = nets = None
    if tokenizer_stage:
        model = (stage1_tokenizer(args) if args.stage == "1" else stage2_tokenizer(args, log)).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
        nets = loss_networks(args, device, log)
        if args.gan_start >= 0:
            disc = perceptual.Discriminator(**({} if args.preset != "tiny" else dict(base_channels=16))).to(device)
            disc_opt = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.9, 0.99),
                                         weight_decay=args.weight_decay)
        image_size, frozen_tok = model.config.image_size, None
    else:
        frozen_tok = load_frozen_tokenizer(args.tokenizer, device)
        image_size = frozen_tok.config.image_size
    source = codes_source(args, frozen_tok, image_size, device, log, rank, world) if not tokenizer_stage else None
    dataset = source if source is not None else data.build_dataset(
        args.data, image_size, train=True, flip=False, seed=args.seed, n_images=args.n_images,
        max_bad_fraction=args.max_bad_fraction)
    if not tokenizer_stage:
        overrides = {k: getattr(args, k) for k in ("dropout", "token_dropout", "class_dropout")
                     if getattr(args, k) is not None}
        cfg = alitok.generator_config(args.gen_preset, tokenizer=frozen_tok.config,
                                      num_classes=dataset.num_classes, **overrides)
        model = alitok.Generator(cfg).to(device)
        opt = torch.optim.AdamW(ar_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.96))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info(f"stage {args.stage}: {n_params / 1e6:.2f}M trainable parameters, {len(dataset)} training items, "
             f"global batch {args.batch_size} = {world} x {args.batch_size // world}, {device}, {precision}")

    # Resume.
    start, ckpt_path = 0, os.path.join(args.out, "ckpt.pt")
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        alitok.load_strict(model, ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if disc is not None and ck.get("disc") is not None:
            disc.load_state_dict(ck["disc"])
            disc_opt.load_state_dict(ck["disc_optimizer"])
        start = ck["step"]
        set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
        log.info(f"resumed from {ckpt_path} at step {start}")
    elif args.resume:
        log.info(f"--resume: no {ckpt_path} yet, starting from step 0")
    if start >= args.steps:
        log.info(f"already trained to step {start} >= --steps {args.steps}; nothing to do")
        finish(args, model, rank, frozen_tok)
        return

    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    ddp_disc = DDP(disc, device_ids=[device.index] if device.type == "cuda" else None) if disc and world > 1 else disc
    batches = StepBatches(len(dataset), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                              pin_memory=device.type == "cuda", collate_fn=collate,
                                              generator=torch.Generator()))  # leaves the global RNG alone
    fixed = torch.stack([dataset[i][0] for i in range(8)]) if tokenizer_stage else None
    codebook_size = (model.config if tokenizer_stage else frozen_tok.config).codebook_size
    sums, counts, t0, seen = {}, torch.zeros(codebook_size, device=device), time.time(), 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0 or args.no_progress,
               desc=f"stage {args.stage}", dynamic_ncols=True)
    for step in bar:
        x, y = next(loader)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        lr = lr_at(step, args.lr, args.warmup, args.steps, args.lr_min)
        for group in opt.param_groups:
            group["lr"] = lr
        if tokenizer_stage:
            x = random_flip(x, args.seed, step, share)
            parts = tokenizer_step(args, ddp, model, ddp_disc, opt, disc_opt, nets, x, step, autocast)
            counts += torch.bincount(parts.pop("codes").flatten(), minlength=codebook_size)
        else:
            codes = (pick_crop(x, args.seed, step, share) if source is not None
                     else frozen_tok.encode(random_flip(x, args.seed, step, share)))
            parts = generator_step(args, ddp, opt, codes, y, autocast)
            counts += torch.bincount(codes.flatten(), minlength=codebook_size)
        check_finite(parts["loss"], step, ckpt_path, world)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        seen += x.shape[0] * world
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            record = reduce_metrics(sums, seen // args.batch_size, counts, world, done, lr, seen / (time.time() - t0))
            log.metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}")
            sums, counts, t0, seen = {}, torch.zeros_like(counts), time.time(), 0
        if rank == 0 and (done % args.image_every == 0 or done == args.steps):
            save_pictures(args, model, frozen_tok, fixed, done, device)
        stop = args.stop_after is not None and done - start >= args.stop_after
        if done % args.ckpt_every == 0 or done == args.steps or stop:
            rngs = all_rng_states(world)
            if rank == 0:
                data.save_checkpoint({"stage": args.stage, "step": done, "config": asdict(model.config),
                             "model": model.state_dict(), "optimizer": opt.state_dict(),
                             "disc": disc.state_dict() if disc else None,
                             "disc_optimizer": disc_opt.state_dict() if disc else None,
                             "rng": rngs, "args": vars(args),
                             "tokenizer": None if tokenizer_stage else os.path.abspath(args.tokenizer)}, ckpt_path)
        if stop:
            log.info(f"stopped after {args.stop_after} steps at step {done}; continue with --resume")
            break
    bar.close()
    if done == args.steps:
        finish(args, model, rank, frozen_tok)
    elif dist.is_initialized():
        dist.destroy_process_group()


def collate(items):
    """Stack (image or codes, label) items; labels as int64."""
    return torch.stack([torch.as_tensor(a) for a, _ in items]), torch.tensor([int(b) for _, b in items])


def load_frozen_tokenizer(path, device):
    if not os.path.exists(path):
        sys.exit(f"stage ar needs a tokenizer checkpoint: {path} not found. Train one (`python train.py --stage 1`"
                 f" then `--stage 2`) or pass --tokenizer AliTok.pth (the released tokenizer).")
    tok = alitok.load_tokenizer(path).to(device)
    tok.requires_grad_(False)
    return tok


class TenCropCodes(torch.utils.data.Dataset):
    """Pre-tokenized codes: items (all 10 crops' codes int64 [10, T], label); the loop picks one per visit."""

    def __init__(self, path):
        codes = data.CodesDataset(path)                     # validates the file
        self.codes, self.labels, self.num_classes = codes.codes, codes.labels, codes.num_classes

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        return torch.from_numpy(self.codes[i].astype(np.int64)), int(self.labels[i])


def pick_crop(codes, seed, step, share):
    """One of the 10 crops [B, 10, T] -> [B, T] per global batch position, a function of (seed, step)."""
    crop = torch.randint(10, (share.stop,), generator=step_generator(seed, step, 2))[share]
    return codes[torch.arange(len(codes)), crop.to(codes.device)]


def codes_source(args, tok, image_size, device, log, rank, world):
    """The generator's training data: ten-crop codes (made once if missing) or None for on-the-fly encoding."""
    if args.on_the_fly:
        return None
    if not os.path.exists(args.codes):
        log.info(f"pre-tokenizing {args.data} with ten-crop into {args.codes}")
        images = data.build_dataset(args.data, int(image_size * data.TEN_CROP_SCALE), train=False, flip=False,
                                    seed=args.seed, n_images=args.n_images)
        data.pretokenize(tok, images, args.codes, batch_size=64, device=device, progress=not args.no_progress)
        if world > 1:
            dist.barrier()
    return TenCropCodes(args.codes)


def tokenizer_step(args, ddp, model, disc, opt, disc_opt, nets, x, step, autocast):
    """One tokenizer update; after --gan-start, discriminator and tokenizer updates alternate."""
    gan_on = disc is not None and step >= args.gan_start
    if gan_on and (step - args.gan_start) % 2 == 1:            # discriminator step
        with torch.no_grad(), autocast:
            fake = ddp(x)["recon"]
        with autocast:
            d_loss = args.disc_weight * perceptual.hinge_d_loss(disc(x), disc(fake.detach()))
        disc_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        disc_opt.step()
        return {"loss": d_loss.detach(), "d_loss": d_loss.detach(), "codes": torch.zeros(0, dtype=torch.long, device=x.device)}
    with autocast:
        out = ddp(x)
        loss, parts = tokenizer_loss(args, model.config, out, x, step, nets)
        if gan_on:
            parts["g_adv"] = args.gan_weight * perceptual.generator_adv_loss(disc(out["recon"]))
            loss = loss + parts["g_adv"]
    if args.stage == "1" and model.config.track_usage:
        model.quantize.cluster_update_(out["z"].detach())      # CVQ clustering over the global batch
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
    opt.step()
    parts = {k: v.detach() for k, v in parts.items()}
    parts["psnr"] = -10 * torch.log10(F.mse_loss(out["recon"].detach().float(), x.float()))
    return {"loss": loss.detach(), **parts, "codes": out["codes"].detach()}


def generator_step(args, ddp, opt, codes, classes, autocast):
    """One generator update: next-token cross-entropy; returns loss and top-1 token accuracy."""
    with autocast:
        logits = ddp(codes, classes)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ddp.parameters(), args.grad_clip)
    opt.step()
    return {"loss": loss.detach(), "acc": (logits.detach().argmax(-1) == codes).float().mean()}


def check_finite(loss, step, ckpt_path, world):
    """Stop every process on a NaN or infinite loss, keeping the last good checkpoint untouched."""
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)
    if world > 1:
        dist.all_reduce(bad)
    if bad.item() > 0:
        kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
        raise FloatingPointError(f"non-finite loss at step {step}; stopping ({kept}). Try a lower --lr.")


def reduce_metrics(sums, n_steps, counts, world, step, lr, img_per_s):
    """Mean of each summed metric over steps and processes, plus codebook usage; a JSON-ready dict."""
    keys = sorted(sums)
    n = torch.stack([torch.tensor(float(n_steps)).to(counts)] + [sums[k].to(counts) for k in keys])
    n = torch.cat([n, counts])
    if world > 1:
        dist.all_reduce(n)
    steps, vals, counts = n[0], n[1:1 + len(keys)], n[1 + len(keys):]
    record = {"step": step, **{k: float(v / steps) for k, v in zip(keys, vals)}, "lr": lr, "img_per_s": img_per_s}
    if counts.sum() > 0:
        record["codebook_usage"], record["codebook_perplexity"] = codebook_metrics(counts)
    return record


@torch.no_grad()
def save_pictures(args, model, tok, fixed, step, device):
    """Tokenizer: originals above reconstructions. Generator: one row of samples per class."""
    was = model.training
    model.eval()
    if fixed is not None:
        recon = model(fixed.to(device))["recon"].float().cpu()
        images, nrow = torch.cat([fixed, recon]), len(fixed)
    else:
        classes = torch.arange(model.config.num_classes, device=device).repeat_interleave(8)[:8 * 16]
        codes = model.generate(classes, seeds=list(range(len(classes))))
        images, nrow = tok.decode(codes).float().cpu(), 8
    model.train(was)
    for name in (f"{'recon' if fixed is not None else 'samples'}_{step:07d}.png", "latest.png"):
        data.save_grid(images, os.path.join(args.out, name), nrow=nrow)


def finish(args, model, rank, tok):
    """Stage 2 exports the inference tokenizer; every stage writes its final model checkpoint."""
    if rank == 0:
        if args.stage == "2":
            export_inference(model, os.path.join(args.out, "tokenizer.pt"))
        if args.stage == "ar":
            data.save_checkpoint({**alitok.checkpoint(model), "tokenizer": os.path.abspath(args.tokenizer)},
                        os.path.join(args.out, "generator.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(parse_args())
