"""Training: tokenizer stage 1 (causal decoder), stage 2 (bidirectional decoder), and the generator.

    python train.py --stage 1           # tiny tokenizer on the built-in shapes, 2 CPU cores, minutes
    python train.py --stage 2           # stage 2 from the stage-1 checkpoint (the decoder carries over)
    python train.py --stage ar          # tiny generator on ten-crop pre-tokenized codes
    torchrun --nproc_per_node=8 train.py --stage ar --preset L --micro-batch 64 --data /imagenet/train ...
    python train.py --stage 1 --preset alitok --help    # every flag beside the paper's value

Read top to bottom: the recipes, the command line, the schedule and optimizers, then one function per stage that
builds its models, optimizers and losses (stage1, stage2, generator_stage), the two kinds of step, and the loop
they share.
Each step computes what the original training code computes (reference/golden/train_*.npz). --batch-size is the
global batch; --micro-batch splits each process's share into accumulation steps. One file holds model,
optimizers, discriminator, step, RNG states and config; it is written atomically, and --resume continues bit
for bit (data order and augmentations are functions of (seed, step)).
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import alitok
import checkpoints
import data
import heldout
import losses
import plumbing
import run_folder
import weights

# ----------------------------------------------------------------------------------------------------
# Recipes: the paper's settings, quoted from reference/ALITOK_SPEC.md ("spec" below, by section), and ours
# ----------------------------------------------------------------------------------------------------

# Tokenizer. Spec 1, "Losses of the released recipe": "AdamW lr 1e-4 with 10k warm-up steps, decayed by hand to
# 2e-6". Spec 1, "Training, as the original code does it": "tokenizer and discriminator each AdamW with torch
# defaults and only the rate given (betas 0.9/0.999, eps 1e-8, weight decay 0.01 on every trainable tensor), no
# gradient clipping"; "stage 1 about 50k steps with LPIPS 1.0 + perceptual 0.1, about 200k with perceptual 1.0
# while the rate goes 1e-4 -> 2e-5, about 100k with the GAN while it goes 2e-5 -> 2e-6; stage 2 about 50k + 150k
# + 100k the same way, without a new warm-up". One cosine from the end of the LPIPS phase to 2e-6 stands for the
# hand-made decay (2.6e-5 at the GAN start of stage 1). The spec gives no batch size; 256 is ours.
TOKENIZER = dict(batch_size=256, lr=1e-4, lr_min=2e-6, weight_decay=0.01, grad_clip=0.0, lpips_until=50_000,
                 decay_start=50_000, weight_init="original", log_every=100, image_every=5_000, ckpt_every=5_000,
                 eval_every=5_000)
# The tiny tokenizer starts from PyTorch's default init: from the original's (std 0.02 everywhere, a 1x1
# output conv included) a model this small stays for hundreds of steps, with some seeds the whole run, on the
# plateau of the mean image (~12 dB on CIFAR-10), which would decide any comparison of tiny runs.
TINY_TOKENIZER = dict(batch_size=32, steps=1500, lr=1e-3, lr_min=1e-4, warmup=100, decay_start=100,
                      weight_decay=0.01, grad_clip=0.0, weight_init="torch", lpips_until=0, gan_start=-1,
                      log_every=25, image_every=250, ckpt_every=250, eval_every=250)
# Generator. Spec 2, "Training recipe": "AdamW lr 4e-4, betas (0.9, 0.96), weight decay 0.03 except on
# parameters with fewer than 2 dims, norms, biases and embeddings; global batch 2048; linear warm-up 62,500
# steps (100 epochs) then cosine to 1e-5; 500k steps (800 epochs) for B and L, 250k (400 epochs) for XL;
# gradient clip 1.0".
GENERATOR = dict(batch_size=2048, lr=4e-4, lr_min=1e-5, warmup=62_500, decay_start=62_500, weight_decay=0.03,
                 grad_clip=1.0, log_every=100, image_every=10_000, ckpt_every=5_000, eval_every=10_000)
RECIPES = {
    "1": {"alitok": dict(TOKENIZER, steps=350_000, warmup=10_000, gan_start=250_000), "tiny": TINY_TOKENIZER},
    "2": {"alitok": dict(TOKENIZER, steps=300_000, warmup=0, gan_start=200_000),
          "tiny": dict(TINY_TOKENIZER, steps=600, warmup=0, decay_start=0)},
    "ar": {"B": dict(GENERATOR, steps=500_000), "L": dict(GENERATOR, steps=500_000),
           "XL": dict(GENERATOR, steps=250_000),
           "tiny": dict(batch_size=64, steps=600, lr=1e-3, lr_min=1e-5, warmup=50, decay_start=50,
                        weight_decay=0.03, grad_clip=1.0, log_every=25, image_every=300, ckpt_every=100,
                        eval_every=300)},
}
PAPER = {"1": "alitok", "2": "alitok", "ar": "B"}   # the recipe --help quotes beside a tiny default
# Settings of those recipes that the spec does not give (--help says so): how often to log, draw, save and
# evaluate, and the tokenizer's batch and the start of its cosine.
BOOKKEEPING = ("log_every", "image_every", "ckpt_every", "eval_every")
NOT_IN_SPEC = {stage: ("batch_size", "decay_start", *BOOKKEEPING) for stage in ("1", "2")} | {"ar": BOOKKEEPING}
DISCRIMINATORS = {"alitok": {}, "tiny": dict(base_channels=16, pool_size=4)}
# Spec 1, "Stage-2 decoder": "Training stage 2 freezes the encoder, the quantizer and `latent_tokens` (the codes
# do not change)"; by name substring, as the original.
FROZEN = ("encoder", "quantize", "latent_tokens")
# The generator's "norms, biases and embeddings" (spec 2, "Training recipe"), by the original's name substrings
# (reference/golden/train_optimizers.txt lists the tensors each group gets).
NO_WEIGHT_DECAY = ("ln", "bias", "latent_tokens", "mask_token", "embedding", "norm", "gamma", "embed")

SCHEDULE = [  # (flag, type, help)
    ("batch_size", int, "global batch, all processes together"),
    ("steps", int, "length of the run"),
    ("lr", float, "peak learning rate (AdamW)"),
    ("lr_min", float, "rate at the last step"),
    ("warmup", int, "steps of linear warm-up from 0"),
    ("decay_start", int, "step where the cosine decay to --lr-min begins"),
    ("weight_decay", float, "AdamW decoupled weight decay"),
    ("grad_clip", float, "gradient-norm clipping (0: none)"),
    ("lpips_until", int, "tokenizer: LPIPS 1.0 + ConvNeXt 0.1 before this step, ConvNeXt 1.0 after"),
    ("gan_start", int, "tokenizer: GAN from this step, D and tokenizer steps alternating (-1: off)"),
    ("log_every", int, "steps between metrics lines"),
    ("image_every", int, "steps between picture grids"),
    ("ckpt_every", int, "steps between checkpoints"),
    ("eval_every", int, "steps between held-out evaluations (and one at the end)"),
    ("weight_init", str, "tokenizer: 'original' (truncated normal, std 0.02) or 'torch' (PyTorch's defaults for "
                         "Linear and Conv; the codebook keeps the original's)"),
]
# Every numeric flag and its range (plumbing.check_flags), checked before any folder is made.
FLAG_RULES = {"--batch-size": "count", "--micro-batch": "count", "--steps": "count", "--lr": "positive",
              "--lr-min": "nonnegative", "--warmup": "index", "--decay-start": "index", "--weight-decay": "nonnegative",
              "--grad-clip": "nonnegative", "--lpips-until": "index", "--log-every": "count",
              "--image-every": "count", "--ckpt-every": "count", "--eval-every": "count", "--seed": "seed",
              "--n-images": "count", "--eval-images": "count", "--max-bad-fraction": "probability",
              "--stop-after": "count", "--workers": "index", "--aux-weight": "nonnegative",
              "--disc-weight": "nonnegative", "--gan-weight": "nonnegative", "--dropout": "probability",
              "--token-dropout": "probability", "--class-dropout": "probability"}


# ----------------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """The command line. --stage and --preset are read first, so that every schedule flag's default (and
    its --help) is that recipe's, next to the paper's value."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", choices=list(RECIPES))
    first.add_argument("--preset", default="tiny")
    known, _ = first.parse_known_args(argv)
    stage = known.stage or "1"
    recipe = RECIPES[stage].get(known.preset, RECIPES[stage]["tiny"])
    paper_name = known.preset if known.preset in RECIPES[stage] and known.preset != "tiny" else PAPER[stage]
    paper = RECIPES[stage][paper_name]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=list(RECIPES), help="what to train")
    parser.add_argument("--preset", default="tiny", choices=list(RECIPES[stage]),
                        help="recipe and model size: tiny (ours, CPU minutes) or the paper's (default: tiny)")
    parser.add_argument("--data", default="shapes", help="'shapes' (built-in), an ImageNet-layout folder, or an npz")
    parser.add_argument("--n-images", type=int, default=None, help="use this many images of the source")
    parser.add_argument("--eval-images", type=int, default=1000,
                        help="held-out images evaluated (the source's test split, else 2%% training never sees)")
    parser.add_argument("--inception", default=None, metavar="PATH",
                        help=f"tokenizer stages: FID Inception weights for the held-out rFID (default: the cached "
                             f"{weights.INCEPTION_WEIGHTS} if present; training never downloads it)")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="abort if more than this fraction of a folder's images is unreadable")
    parser.add_argument("--out", default=os.path.join("runs", {"1": "stage1", "2": "stage2", "ar": "ar"}[stage]),
                        help="run folder (default: %(default)s)")
    schedule = parser.add_argument_group(f"schedule (defaults: the {known.preset} recipe; paper: the {PAPER[stage]} "
                                         f"one)")
    for key, kind, what in SCHEDULE:
        if key in recipe:
            beside = (f"paper: not given, {paper_name} recipe {paper[key]}" if key in NOT_IN_SPEC[stage]
                      else f"paper {paper[key]}")
            schedule.add_argument("--" + key.replace("_", "-"), type=kind, default=recipe[key],
                                  help=f"{what} (default %(default)s; {beside})")
    schedule.add_argument("--micro-batch", type=int, default=None,
                          help="sequences or images per process and forward pass: each process's share of "
                               "--batch-size is accumulated in steps of this size (default: the whole share at once)")
    schedule.add_argument("--seed", type=int, default=0, help="data order, augmentations, dropout: 0 to 4294967295 "
                          "(default 0)")
    (add_tokenizer_flags if stage in ("1", "2") else add_generator_flags)(parser, stage)
    system = parser.add_argument_group("system")
    system.add_argument("--resume", action="store_true", help="continue the run in --out (from its ckpt.pt)")
    system.add_argument("--restart", action="store_true", help="start over in an --out that holds a run: its "
                        "checkpoint, logs, pictures and final file are replaced (without --resume or --restart such "
                        "a folder is refused)")
    system.add_argument("--stop-after", type=int, default=None,
                        help="checkpoint and exit after this many steps of this run (time-limited jobs)")
    system.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    system.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="autocast of the trained model (losses stay float32); default bf16 on cuda, else fp32")
    system.add_argument("--workers", type=int, default=None, help="DataLoader workers per process, also for "
                        "ten-crop pre-tokenization (default: on cuda min(8, CPU cores per process), else 0)")
    system.add_argument("--no-progress", action="store_true")
    system.add_argument("--offline", action="store_true",
                        help=f"never download weight files (as {weights.OFFLINE_ENV}=1)")
    return parser.parse_args(argv)


def add_tokenizer_flags(parser, stage):
    """Loss weights, loss-network files, and the stage's model switches."""
    loss_flags = parser.add_argument_group("tokenizer losses")
    loss_flags.add_argument("--perceptual-loss", action=argparse.BooleanOptionalAction, default=None,
                            help="the ConvNeXt-S perceptual loss (default: on, off for the tiny preset)")
    loss_flags.add_argument("--lpips-loss", action=argparse.BooleanOptionalAction, default=None,
                            help="the LPIPS loss (default: on, off for the tiny preset)")
    loss_flags.add_argument("--perceptual-weights", default=None, help="torchvision convnext_small-0c510722.pth "
                            "(default: the torch hub cache's copy, downloaded on first use)")
    loss_flags.add_argument("--lpips-weights", nargs=2, default=None, metavar=("VGG16", "LIN"),
                            help="torchvision vgg16-397923af.pth and LPIPS v0.1 vgg.pth (default: cached, as above)")
    # Spec 1, "Stage-1 decoder": "mse(x, x_rec) + 10 * (17/256) * mse(aux_target, x_aux)"; "Losses of the released
    # recipe": "generator term `0.1 * 0.05 * (-mean D(x_rec))`, discriminator term `0.1 * hinge`".
    loss_flags.add_argument("--aux-weight", type=float, default=10.0, help="aux prefix loss weight, times "
                            "n_prefix/n_image (paper 10)")
    loss_flags.add_argument("--disc-weight", type=float, default=0.1,
                            help="discriminator hinge loss weight (paper 0.1)")
    loss_flags.add_argument("--gan-weight", type=float, default=0.1 * 0.05,
                            help="tokenizer adversarial weight (paper 0.005)")
    if stage == "1":
        ablations = parser.add_argument_group("ablations (stage 1)")
        ablations.add_argument("--decoder", choices=["causal", "bidirectional"], default="causal",
                               help="stage-1 decoder attention; bidirectional: the ablation's baseline (prefix, "
                                    "aux head and start token kept: only the mask differs)")
        ablations.add_argument("--no-prefix", action="store_true", help="no prefix tokens (and so no aux head)")
        ablations.add_argument("--no-aux", action="store_true", help="no auxiliary prefix loss")
    else:
        stage2_flags = parser.add_argument_group("stage 2")
        stage2_flags.add_argument("--init", default=os.path.join("runs", "stage1", "ckpt.pt"),
                                  help="the stage-1 checkpoint (default: %(default)s); or a finished tokenizer "
                                       "(the released AliTok.pth, a tokenizer.pt) whose decoder is then fine-tuned "
                                       "on --data")
        stage2_flags.add_argument("--fresh-decoder", action="store_true",
                                  help="ablation: a fresh decoder (the paper's carries the stage-1 decoder over)")


def add_generator_flags(parser, stage):
    """The frozen tokenizer, the codes file and the generator's regularisation."""
    generator_flags = parser.add_argument_group("generator")
    generator_flags.add_argument("--tokenizer", default=os.path.join("runs", "stage2", "tokenizer.pt"),
                                 help="tokenizer checkpoint (default: %(default)s)")
    generator_flags.add_argument("--codes", default=None,
                                 help="pre-tokenized codes npz, made if missing (default: <out>/codes.npz)")
    generator_flags.add_argument("--init", default=None, metavar="GEN",
                                 help="fine-tune: start from this generator (released alitok_{b,l,xl}.bin or a "
                                      "generator.pt) with its size; the class rows of its embedding table are resized "
                                      "to --data's classes (--preset then picks only the schedule)")
    # Spec 2, "Sequence": "Embedding dropout 0.1; the class is replaced by the null class with probability 0.1";
    # "Block": "causal attention (dropout 0.1 in training)", and dropout 0.1 after the projection and the FFN.
    generator_flags.add_argument("--dropout", type=float, default=None,
                                 help="attention/FFN/residual dropout (paper 0.1)")
    generator_flags.add_argument("--token-dropout", type=float, default=None,
                                 help="input embedding dropout (paper 0.1)")
    generator_flags.add_argument("--class-dropout", type=float, default=None,
                                 help="null-class probability (paper 0.1)")


def check_args(args, world):
    """Refuse flags that cannot work, before any folder is made: ranges (FLAG_RULES), and a global batch that
    does not split into processes and micro-batches. Sets args.accumulate (micro-batches per step)."""
    plumbing.check_flags(args, {flag: kind for flag, kind in FLAG_RULES.items()     # this stage's flags
                                if hasattr(args, flag[2:].replace("-", "_"))})
    if getattr(args, "gan_start", -1) < -1:
        raise ValueError(f"--gan-start {args.gan_start}: expected a step >= 0, or -1 for no GAN")
    if args.resume and args.restart:
        raise ValueError("--resume continues the run in --out and --restart replaces it: give one of them")
    share = args.batch_size // world
    micro = args.micro_batch or share
    if args.batch_size % world or share % micro:
        raise ValueError(f"--batch-size {args.batch_size} must split into {world} process(es) x --micro-batch "
                         f"{micro} x a whole number of accumulation steps; {args.batch_size} / {world} = "
                         f"{args.batch_size / world:g} per process")
    args.accumulate = share // micro


# ----------------------------------------------------------------------------------------------------
# Schedule and optimizers
# ----------------------------------------------------------------------------------------------------

def lr_at(step, args):
    """The rate at a step: linear warm-up from 0 (step / warmup, as the original), held at --lr until
    --decay-start, then cosine to --lr-min at --steps (spec 2, "Training recipe": "linear warm-up 62,500 steps
    (100 epochs) then cosine to 1e-5")."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    start = max(args.warmup, args.decay_start)
    if step < start:
        return args.lr
    progress = min(1.0, (step - start) / max(1, args.steps - start))
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers, lr):
    """Every optimizer at the schedule's current rate (spec 1, "Training, as the original code does it": "the
    discriminator's rate is the run's current rate")."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def trainable(model):
    """The parameters that train (stage 2 leaves the frozen ones out of its optimizer)."""
    return [param for param in model.parameters() if param.requires_grad]


def adamw(groups, **settings):
    """AdamW over parameter groups, fused on CUDA (one kernel for all tensors, no host sync)."""
    groups = list(groups)
    first = groups[0]["params"][0] if isinstance(groups[0], dict) else groups[0]
    return torch.optim.AdamW(groups, **settings, fused=first.is_cuda or None)


def tokenizer_optimizer(params, args):
    """The original's tokenizer and discriminator optimizer: AdamW with torch's defaults besides the rate
    (betas 0.9/0.999, eps 1e-8, --weight-decay 0.01 on every tensor)."""
    return adamw(params, lr=args.lr, weight_decay=args.weight_decay)


def generator_param_groups(model, weight_decay):
    """The original's AdamW groups: no decay for tensors with ndim < 2 or a name containing any of
    NO_WEIGHT_DECAY (embeddings, norms, biases), `weight_decay` for the rest."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            no_decay_name = any(part in name for part in NO_WEIGHT_DECAY)
            (no_decay if param.ndim < 2 or no_decay_name else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def generator_optimizer(model, args):
    """AdamW with betas (0.9, 0.96) over generator_param_groups."""
    return adamw(generator_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.96))


def accumulate(micro_batches, loss_of, wrapped):
    """Backward of loss_of(batch)["loss"] / k over the k micro-batches, DDP's gradient all-reduce only in the last
    (no_sync before): the gradient of the mean loss over the whole batch. The metrics averaged, detached."""
    n_micro, metrics = len(micro_batches), {}
    for index, batch in enumerate(micro_batches):
        last = index == n_micro - 1 or not isinstance(wrapped, DDP)
        with contextlib.nullcontext() if last else wrapped.no_sync():
            parts = loss_of(batch)
            (parts["loss"] / n_micro).backward()
        for key, value in parts.items():
            value = torch.as_tensor(value).detach()
            metrics[key] = metrics[key] + value / n_micro if key in metrics else value / n_micro
    return metrics


def optimizer_step(opt, params, clip):
    """Clip the accumulated gradient's norm to `clip` (0: no clipping), one optimizer step; the norm before
    clipping (a tensor: no host sync). The gradients stay until the next step's zero_grad."""
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    opt.step()
    return norm


def wrap(module, device, world):
    """DDP under torchrun, the module itself in one process."""
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module


# ----------------------------------------------------------------------------------------------------
# Stage 1 (Sec. 3): the tokenizer against a causal decoder, the aux loss and the clustering codebook update
# ----------------------------------------------------------------------------------------------------

def stage1(args, device, world, autocast, log):
    """A new tokenizer trained end to end (with the ablations asked for), the discriminator when a GAN phase is
    asked for, the loss networks, the images in the tokenizer's training view."""
    model = stage1_tokenizer(args).to(device)
    # Spec 1, "Losses of the released recipe": "generator and discriminator steps alternate, switched on late in
    # each stage".
    disc = losses.Discriminator(**DISCRIMINATORS[args.preset]).to(device) if args.gan_start >= 0 else None
    stage = TokenizerStage(model, wrap(model, device, world), losses.loss_networks(args, device, log), args, autocast,
                           disc, disc and wrap(disc, device, world))
    return stage.with_data(args, device, log)


def stage1_tokenizer(args):
    """The stage-1 tokenizer (STAGES[1]: causal decoder, one start token, the aux head, clustering) with the
    ablations asked for. Every variant starts from AliTok's initial weights wherever name and shape match and
    leaves the RNG where AliTok's build leaves it, so variants of one seed are paired."""
    cfg = alitok.tokenizer_config(args.preset, 1)
    reference = init_weights(alitok.Tokenizer(cfg), args.weight_init)
    variant = dict(causal=args.decoder == "causal", **({"n_prefix": 0} if args.no_prefix else {}),
                   **({"aux_head": False} if args.no_aux else {}))
    if alitok.tokenizer_config(args.preset, 1, **variant) == cfg:
        return reference
    with torch.random.fork_rng(devices=[]):
        model = init_weights(alitok.Tokenizer(alitok.tokenizer_config(args.preset, 1, **variant)), args.weight_init)
    carry_over(model, reference.state_dict())
    return model


def init_weights(module, scheme):
    """The tokenizer's init (it is built with the original's, spec 1, "Training, as the original code does it":
    "truncated normal std 0.02 and zero bias for every Linear and Conv"): 'original' keeps it, 'torch' gives every
    Linear and Conv PyTorch's default init."""
    if scheme not in ("original", "torch"):
        raise ValueError(f"--weight-init {scheme!r}: expected 'original' or 'torch'")
    if scheme == "torch":
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                layer.reset_parameters()
    return module


# ----------------------------------------------------------------------------------------------------
# Stage 2 (Sec. 3): the encoder and codebook frozen, a bidirectional decoder with buffer tokens
# ----------------------------------------------------------------------------------------------------

def stage2(args, device, world, autocast, log):
    """Stage 2 from the stage-1 checkpoint (stage2_tokenizer), the discriminator carried over when a GAN phase is
    asked for, the loss networks, the images; at the end the tokenizer in the released inference layout
    (<out>/tokenizer.pt)."""
    model, first = stage2_tokenizer(args, log)
    model = model.to(device)
    disc = None
    if args.gan_start >= 0:
        disc = losses.Discriminator(**DISCRIMINATORS[args.preset]).to(device)
        if "discriminator" in first.get("modules", {}):
            checkpoints.load_strict(disc, first["modules"]["discriminator"], source=args.init)
            log.info(f"stage 2: the discriminator carries over from {args.init}")
    stage = TokenizerStage(model, wrap(model.decoder, device, world), losses.loss_networks(args, device, log), args,
                           autocast, disc, disc and wrap(disc, device, world), frozen_encoder=True)
    stage.final = os.path.join(args.out, "tokenizer.pt")
    return stage.with_data(args, device, log)


def stage2_tokenizer(args, log):
    """The stage-2 tokenizer: every tensor of the stage-1 checkpoint whose name and shape match (encoder,
    codebook, the whole decoder trunk) carries over, "only the 32 buffer tokens and the 305-row positional table
    are new" (spec 1, "Stage-2 decoder"); the encoder, quantizer and latent tokens frozen. (model, the stage-1
    file)."""
    first = checkpoints.read_checkpoint(args.init, "the stage-1 checkpoint (train it with `python train.py "
                                                   "--stage 1`, or pass --init PATH)")
    if isinstance(first, dict) and "stage" not in first:       # a finished tokenizer: AliTok.pth, a tokenizer.pt
        return finished_tokenizer(first, args, log), {}
    made = (first.get("stage"), first.get("args", {}).get("preset")) if isinstance(first, dict) else None
    if made != ("1", args.preset) or "config" not in first:
        raise ValueError(f"--init {args.init} holds {run_folder.describe(first)}; stage 2 of preset {args.preset} "
                         f"starts from a stage-1 run of preset {args.preset} (its <out>/ckpt.pt): pass that file "
                         f"with --init")
    cfg = replace(alitok.TokenizerConfig(**first["config"]), **alitok.STAGES[2],
                  n_buffer=alitok.TOKENIZER_PRESETS[args.preset].n_buffer)
    model = alitok.Tokenizer(cfg)
    init_weights(model.decoder, args.weight_init)                  # what carry_over does not replace
    loaded, new, dropped = carry_over(model, first["model"], FROZEN if args.fresh_decoder else None)
    log.info(f"stage 2: {len(loaded)} tensors from {args.init}, {len(new)} new ({', '.join(new[:4])}"
             f"{' ...' if len(new) > 4 else ''}), {len(dropped)} dropped")
    return freeze_for_stage2(model), first


def finished_tokenizer(saved, args, log):
    """Stage 2 from a finished tokenizer (the released AliTok.pth or a stage-2 tokenizer.pt), every tensor from
    it strictly: its decoder fine-tuned on --data (a new domain) over frozen codes; the discriminator starts new."""
    try:
        model = checkpoints.load_tokenizer(saved)
    except ValueError as error:
        raise ValueError(f"--init {args.init} is neither a stage-1 run nor a finished tokenizer ({str(error)[:300]}); "
                         f"pass the stage-1 <out>/ckpt.pt, the released AliTok.pth or a tokenizer.pt") from None
    if model.config.causal:
        raise ValueError(f"--init {args.init} holds a causal (stage-1) decoder without its training state; pass "
                         f"that stage-1 run's <out>/ckpt.pt")
    log.info(f"stage 2: fine-tuning the decoder of the finished tokenizer {args.init} (every tensor from it; the "
             f"encoder, codebook and latent tokens frozen, so its codes stay those of the file)")
    return freeze_for_stage2(model.train())


def carry_over(model, state, names=None):
    """Load every tensor of `state` whose name and shape match model's (only names starting with one of
    `names`, if given), as the original's stage-2 start; returns (loaded, new, dropped) name lists."""
    own = model.state_dict()
    loaded = [name for name, tensor in own.items() if name in state and state[name].shape == tensor.shape
              and (names is None or name.startswith(names))]
    new = sorted(set(own) - set(loaded), key=list(own).index)
    dropped = [name for name in state if name not in own]
    checkpoints.load_strict(model, {**own, **{name: state[name] for name in loaded}})
    return loaded, new, dropped


def freeze_for_stage2(model):
    """Freeze the encoder, the quantizer and the latent tokens (by name, as the original): the codes stay."""
    for name, param in model.named_parameters():
        param.requires_grad_(not any(part in name for part in FROZEN))
    return model


# ----------------------------------------------------------------------------------------------------
# The tokenizer's step, both stages: the original's criterion, tokenizer and discriminator steps alternating
# ----------------------------------------------------------------------------------------------------

class TokenizerStage:
    """A tokenizer stage as the loop runs it; nets: losses.LossNetworks (or a (convnext, lpips) pair). The original's
    tokenizer trainer has no gradient accumulation (one batch, one forward, one step per iteration); here a step
    of k micro-batches is all tokenizer or all discriminator updates (they alternate by step, as the original by
    iteration), and the clustering update runs in every train-mode forward, so once per micro-batch, on that
    micro-batch's encoder outputs gathered over the processes (spec 1, "Training, as the original code does it":
    "inside every training-mode forward of stage 1 (also those of discriminator iterations)")."""

    def __init__(self, model, trained, nets, args, autocast=contextlib.nullcontext(), disc=None, disc_ddp=None,
                 frozen_encoder=False):
        self.model, self.trained, self.args, self.autocast = model, trained, args, autocast
        self.nets = losses.LossNetworks(*nets)
        self.disc, self.disc_ddp, self.frozen_encoder = disc, disc_ddp or disc, frozen_encoder
        self.optimizers = {"model": tokenizer_optimizer(trainable(model), args)}
        if disc is not None:         # "tokenizer and discriminator each AdamW with torch defaults" (spec 1)
            self.optimizers["discriminator"] = tokenizer_optimizer(disc.parameters(), args)
        self.modules = {"discriminator": disc} if disc is not None else {}
        self.codebook_size, self.saved, self.final = model.config.codebook_size, {}, None

    def with_data(self, args, device, log):
        """The training images (the tokenizer's training view), eight fixed ADM centre crops for the pictures,
        the held-out images and, where the Inception file is at hand, the held-out rFID's network."""
        self.dataset, held = data.heldout_split(args.data, self.model.config.image_size, seed=args.seed,
                                                n_images=args.n_images, n_heldout=args.eval_images,
                                                max_bad_fraction=args.max_bad_fraction)
        self.saved["data_fingerprint"] = data.source_fingerprint(args.data)
        self.fixed = torch.stack([self.dataset[index][0] for index in range(min(8, len(self.dataset)))])
        self.heldout_images, _ = data.heldout_images(held)
        self.inception = heldout.rfid_network(args, device, log)
        return self

    def forward(self, images):
        """Stage 1: the whole tokenizer under autocast (its quantizer in float32). Stage 2: the frozen encoder and
        quantizer in float32 without gradients (the codes are the inference codes), then the decoder under
        autocast."""
        if not self.frozen_encoder:
            with self.autocast:
                return self.trained(images)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False), plumbing.exact_float32():
            zq, codes, _ = self.model.quantize(self.model.encoder(images, self.model.latent_tokens))
        with self.autocast:
            recon, aux = self.trained(zq)
        return dict(recon=recon, aux=aux, codes=codes)

    def step(self, micro_batches, step):
        """One step on micro-batches [(images, labels)]: a discriminator update at the odd steps of the GAN phase,
        else a tokenizer update; the metrics (tensors) and the step's codes."""
        args, opt = self.args, self.optimizers["model"]
        if self.disc is not None and 0 <= args.gan_start <= step and (step - args.gan_start) % 2 == 1:
            return self.discriminator_step(micro_batches)
        weights, codes = losses.loss_weights(args, step, self.nets.lpips is not None), []

        def loss_of(batch):
            images = batch[0]
            out = self.forward(images)
            parts = losses.tokenizer_losses(out, images, self.nets, self.disc, weights, self.model.config,
                                            args.aux_weight)
            parts["psnr"] = -10 * torch.log10(F.mse_loss(out["recon"].detach().float(), images))
            codes.append(out["codes"])
            return parts
        opt.zero_grad(set_to_none=True)
        metrics = accumulate(micro_batches, loss_of, self.trained)
        metrics["grad_norm"] = optimizer_step(opt, trainable(self.model), args.grad_clip)
        return {**metrics, "codes": torch.cat(codes)}

    def discriminator_step(self, micro_batches):
        """A discriminator update on the batch and its reconstructions (the tokenizer's train-mode forward runs,
        so the clustering update does too, as in the original)."""
        opt = self.optimizers["discriminator"]

        def loss_of(batch):
            with torch.no_grad():
                fake = self.forward(batch[0])["recon"]
            loss, real, fake_logits = losses.discriminator_loss(self.disc_ddp, batch[0], fake, self.args.disc_weight)
            return {"loss": loss, "d_loss": loss, "d_real": real.mean(), "d_fake": fake_logits.mean()}
        opt.zero_grad(set_to_none=True)
        metrics = accumulate(micro_batches, loss_of, self.disc_ddp)
        optimizer_step(opt, list(self.disc.parameters()), self.args.grad_clip)
        return {**metrics, "codes": torch.zeros(0, dtype=torch.long, device=micro_batches[0][0].device)}

    def heldout(self):
        """Held-out PSNR, code usage and perplexity (and rFID with the Inception file), eval mode."""
        return heldout.tokenizer_heldout(self.model, self.heldout_images, self.autocast, self.inception)

    @torch.no_grad()
    def pictures(self):
        """Originals above their reconstructions (eval mode: no codebook update); (images, images per row)."""
        recon = self.model(self.fixed.to(self.model.latent_tokens.device))["recon"].float().cpu()
        return torch.cat([self.fixed, recon]), len(self.fixed)

    def finish(self):
        """Stage 2's final file: the tokenizer in the released inference layout."""
        if self.final is not None:
            plumbing.save_checkpoint({**checkpoints.checkpoint(self.model), **self.saved}, self.final)


# ----------------------------------------------------------------------------------------------------
# The generator (Sec. 4): next-token prediction on ten-crop codes of the frozen tokenizer
# ----------------------------------------------------------------------------------------------------

def generator_stage(args, device, world, autocast, log):
    """The frozen tokenizer, its ten-crop codes (spec 2, "Training recipe": "ImageNet train pre-tokenized with
    ten-crop"; made once if missing), the generator sized to the tokenizer's tokens and the data's classes, and
    its optimizer, as a GeneratorStage."""
    tok = checkpoints.load_frozen_tokenizer(args.tokenizer, device)
    fingerprint = checkpoints.codebook_fingerprint(tok)
    codes = args.codes or os.path.join(args.out, "codes.npz")
    made = not os.path.exists(codes)
    if made:
        log.info(f"pre-tokenizing {args.data} with ten-crop into {codes}")
        images, _ = data.heldout_split(args.data, int(tok.config.image_size * data.TEN_CROP_SCALE), seed=args.seed,
                                       n_images=args.n_images, max_bad_fraction=args.max_bad_fraction)
        made_from = f"tokenizer {fingerprint}, --data {args.data}"
        with plumbing.StopSignals() as signals:     # a stop keeps the parts done; the same command continues
            data.pretokenize(tok, images, codes, batch_size=64, device=device, progress=not args.no_progress,
                             num_workers=args.workers, seed=args.seed, made_from=made_from, signals=signals,
                             tokenizer_fingerprint=fingerprint)
    try:
        dataset = data.CodesDataset(codes)
        check_codes(dataset, codes, tok, fingerprint, args.tokenizer)
    except ValueError:
        if made:                # a refused run leaves no codes behind
            with contextlib.suppress(FileNotFoundError):
                os.remove(codes)
        raise
    overrides = {name: getattr(args, name) for name in ("dropout", "token_dropout", "class_dropout")
                 if getattr(args, name) is not None}
    if args.init:
        model = init_generator(args, tok, dataset.class_names, overrides, log).to(device)
    else:
        cfg = alitok.generator_config(args.preset, tokenizer=tok.config, num_classes=dataset.num_classes, **overrides)
        model = alitok.Generator(cfg).to(device)
    stage = GeneratorStage(model, wrap(model, device, world), args, autocast)
    stage.dataset, stage.tokenizer = dataset, tok
    stage.heldout_codes, stage.heldout_labels = heldout.heldout_codes(tok, args, device)
    # the path finds the tokenizer again; the fingerprints tell sample.py and --resume whether inputs are the same
    stage.saved = {"tokenizer": os.path.abspath(args.tokenizer), "tokenizer_fingerprint": fingerprint,
                   "data_fingerprint": data.source_fingerprint(args.data), "class_names": list(dataset.class_names)}
    stage.final = os.path.join(args.out, "generator.pt")
    return stage


def check_codes(dataset, path, tok, fingerprint, tok_path):
    """Refuse codes that another tokenizer made (its codebook fingerprint, its tokens per image): the generator
    would learn codes that --tokenizer decodes into other images."""
    theirs = (f"tokenizer fingerprint {dataset.tokenizer_fingerprint}" if dataset.tokenizer_fingerprint
              else "no tokenizer fingerprint")
    if dataset.n_tokens != tok.config.n_tokens or dataset.tokenizer_fingerprint != fingerprint:
        raise ValueError(f"codes {path} ({dataset.n_tokens} tokens per image, {theirs}) were not made by --tokenizer "
                         f"{tok_path} ({tok.config.n_tokens} tokens per image, fingerprint {fingerprint}): pass the "
                         f"--tokenizer they were made with, or another --codes (a new path is made from --data)")


def init_generator(args, tok, names, overrides, log):
    """The --init generator, refused when its codes are not the tokenizer's, with the class rows of its embedding
    table resized to the data's classes `names` (checkpoints.generator_for_classes); says which rows are new."""
    ckpt = checkpoints.read_checkpoint(args.init, "the generator to fine-tune (--init)")
    trained = ckpt.get("tokenizer_fingerprint") if isinstance(ckpt, dict) else None
    if trained is not None and trained != checkpoints.codebook_fingerprint(tok):
        raise ValueError(f"--init {args.init} was trained on the codes of another tokenizer (codebook fingerprint "
                         f"{trained}) than --tokenizer {args.tokenizer}: pass the tokenizer it was trained on "
                         f"(AliTok.pth for the released generators)")
    model, kept, new = checkpoints.generator_for_classes(ckpt, names, **overrides)
    gen_cfg, tok_cfg = model.config, tok.config
    if (gen_cfg.codebook_size, gen_cfg.n_prefix, gen_cfg.grid) != (tok_cfg.codebook_size, tok_cfg.n_prefix,
                                                                   tok_cfg.grid):
        raise ValueError(f"--init {args.init} models {gen_cfg.n_prefix} + {gen_cfg.grid}^2 tokens of "
                         f"{gen_cfg.codebook_size} codes, --tokenizer {args.tokenizer} makes {tok_cfg.n_prefix} + "
                         f"{tok_cfg.grid}^2 of {tok_cfg.codebook_size}: pass the tokenizer it was trained on "
                         f"(AliTok.pth for the released generators)")
    listed = lambda rows: (", ".join(names[c] for c in rows[:8]) or "none") + (" ..." if len(rows) > 8 else "")
    log.info(f"--init {args.init}: every tensor from it, the embedding table's class rows resized to {len(names)} "
             f"classes: new rows for {listed(new)}; kept rows for {listed(kept)}")
    return model.train()


PICTURE_CLASSES, PICTURES_PER_CLASS = 8, 2     # a bounded picture count: the sampling's KV cache fits the plan


def sampling_copy(model, dtype):
    """A copy of a generator with its weights in `dtype` (built on the meta device: no init, no RNG drawn), for
    sampling beside training: its KV cache takes the weights' dtype."""
    with torch.device("meta"):
        copy = alitok.Generator(model.config)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, assign=True)
    copy.rope = model.rope                       # the float32 rotary table, not in the state dict
    return copy.eval()


class GeneratorStage:
    """The generator as the loop runs it: "AdamW lr 4e-4, betas (0.9, 0.96), weight decay 0.03 except on
    parameters with fewer than 2 dims, norms, biases and embeddings ... gradient clip 1.0; bf16 autocast; no EMA"
    (spec 2, "Training recipe"). Under accelerate's gradient accumulation the original divides each micro-batch's
    loss by the number of micro-batches and clips and steps once; so does this."""

    def __init__(self, model, trained, args, autocast=contextlib.nullcontext()):
        self.model, self.trained, self.args, self.autocast = model, trained, args, autocast
        self.optimizers, self.modules = {"model": generator_optimizer(model, args)}, {}
        self.codebook_size, self.saved, self.final = model.config.codebook_size, {}, None

    def step(self, micro_batches, step):
        """One update on micro-batches [(codes, classes)]: next-token cross-entropy (mean over all tokens), clip,
        AdamW; loss, token accuracy, the gradient norm before clipping, and the step's codes."""
        opt = self.optimizers["model"]

        def loss_of(batch):
            codes, classes = batch
            with self.autocast:
                logits = self.trained(codes, classes)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))
            return {"loss": loss, "acc": (logits.detach().argmax(-1) == codes).float().mean()}
        opt.zero_grad(set_to_none=True)
        metrics = accumulate(micro_batches, loss_of, self.trained)
        metrics["grad_norm"] = optimizer_step(opt, list(self.model.parameters()), self.args.grad_clip)
        return {**metrics, "codes": torch.cat([codes for codes, _ in micro_batches])}

    def heldout(self):
        """Held-out next-token loss and accuracy (all, prefix and image tokens), eval mode."""
        return heldout.generator_heldout(self.model, self.heldout_codes, self.heldout_labels, self.autocast)

    def pictures(self):
        """PICTURES_PER_CLASS samples of each of the first PICTURE_CLASSES classes (32 sequences with guidance),
        decoded; (images, images per row). On CUDA from a bfloat16 copy of the generator (sampling_copy), so that
        its KV cache is bfloat16 too; the KV caches are freed after: training does not use them."""
        classes = torch.arange(min(PICTURE_CLASSES, self.model.config.num_classes)).repeat(PICTURES_PER_CLASS)
        cuda = self.model.output.weight.is_cuda
        sampler = sampling_copy(self.model, torch.bfloat16) if cuda else self.model
        codes = sampler.generate(classes, seeds=list(range(len(classes))))
        sampler.free_cache()
        return self.tokenizer.decode(codes).float().cpu(), len(classes) // PICTURES_PER_CLASS

    def finish(self):
        """The generator checkpoint, with its tokenizer's path."""
        plumbing.save_checkpoint({**checkpoints.checkpoint(self.model), **self.saved}, self.final)


# ----------------------------------------------------------------------------------------------------
# The training loop: the same for every stage
# ----------------------------------------------------------------------------------------------------

STAGE_BUILDERS = {"1": stage1, "2": stage2, "ar": generator_stage}


def main(argv=None):
    """Train one stage; 0 when done or stopped by --stop-after, 128 + the signal number when SIGTERM/SIGINT
    stopped it (after writing the checkpoint)."""
    args = parse_args(argv)
    check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    process = plumbing.setup_distributed(args.device)
    rank, world, device = process.rank, process.world, process.device
    if args.workers is None:       # decoding images beside the GPU, not between its steps
        per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        args.workers = min(8, per_process) if device.type == "cuda" else 0
    run_folder.check_inputs_outside(args)
    plumbing.make_run_folder(args.out)
    ckpt = os.path.join(args.out, "ckpt.pt")
    # rank 0 holds the folder for the whole run: a second run on it is refused, naming this process
    with plumbing.RunFolderLock(args.out) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            plumbing.remove_stale_temporaries(args.out)      # a killed save's ckpt.pt.tmp<pid>
        log = plumbing.Logger(args.out, rank)
        saved = run_folder.read_resumable(ckpt, args, log) if args.resume else None   # checked before any setup
        if not args.resume:
            run_folder.refuse_or_restart(args, rank, log)
        # reduced precision for the trained model, "the whole loss module ... in float32 with autocast off" (spec 1,
        # "Training, as the original code does it"); the generator: "bf16 autocast" (spec 2, "Training recipe")
        precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        if device.type == "cuda":   # as DiT and LlamaGen train; the frozen networks opt out (plumbing.exact_float32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed + rank)
        stage = STAGE_BUILDERS[args.stage](args, device, world, plumbing.autocast(device, precision), log)
        n_params = sum(param.numel() for param in trainable(stage.model))
        log.info(f"stage {args.stage}: {n_params / 1e6:.2f}M trainable parameters, {len(stage.dataset)} training "
                 f"items, global batch {args.batch_size} = {world} x {args.accumulate} x "
                 f"{args.batch_size // world // args.accumulate}, {device}, {precision}")
        start = run_folder.resume(stage, saved, ckpt, rank, world, log) if saved is not None else 0
        if start >= args.steps:
            log.info(f"{args.out}: already trained to step {start} (--steps {args.steps}); nothing to do")
        with plumbing.StopSignals() as signals:
            done, signum = train_loop(stage, args, start, ckpt, process, log, signals)
        if signum:
            log.info(f"received {signal.Signals(signum).name} at step {done}: wrote {ckpt}; continue with --resume")
        elif done >= args.steps and rank == 0 and not (start >= args.steps and stage.final
                                                        and os.path.exists(stage.final)):
            stage.finish()
    plumbing.barrier()
    if plumbing.is_distributed():
        dist.destroy_process_group()
    return 128 + signum if signum else 0


def train_loop(stage, args, start, ckpt, process, log, signals):
    """Steps start..--steps-1 of this plumbing.Process with logs, pictures and checkpoints; stops early at
    --stop-after or at a stop signal (checkpoint written either way). (steps done, the agreed signal number or 0).
    No host sync inside a step: losses, metrics and code counts stay on the device and are read at log,
    evaluation, picture and checkpoint steps, where a non-finite loss stops the run before anything is written."""
    rank, world, device = process.rank, process.world, process.device
    batches = data.StepBatches(len(stage.dataset), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = iter(torch.utils.data.DataLoader(stage.dataset, batch_sampler=batches, num_workers=args.workers,
                                              pin_memory=device.type == "cuda", collate_fn=collate,
                                              generator=torch.Generator().manual_seed(args.seed)))
    micro = args.batch_size // world // args.accumulate
    signal_group = dist.new_group(backend="gloo") if world > 1 else None   # agreed on the host, every step
    counts = torch.zeros(stage.codebook_size, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)   # first step with a non-finite loss
    sums, t0, seen, done, signum, kept = {}, time.time(), 0, start, 0, start
    if start:
        log.last_good = f"the last good checkpoint is {ckpt} at step {start}"
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0 or args.no_progress,
               desc=f"stage {args.stage}", dynamic_ncols=True)
    for step in bar:
        inputs, labels = (batch.to(device, non_blocking=True) for batch in next(loader))
        lr = lr_at(step, args)
        set_lr(stage.optimizers.values(), lr)
        metrics = stage.step(list(zip(inputs.split(micro), labels.split(micro))), step)
        codes = metrics.pop("codes").flatten()
        counts.index_add_(0, codes, torch.ones_like(codes, dtype=counts.dtype))
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(metrics["loss"]), step, first_bad)
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value.float()
        seen, done = seen + inputs.shape[0] * world, step + 1
        signum = plumbing.agreed_signal(signals, signal_group)
        stop = args.stop_after is not None and done - start >= args.stop_after
        logged = done % args.log_every == 0 or done == args.steps
        evaluated = done % args.eval_every == 0 or done == args.steps
        pictured = done % args.image_every == 0 or done == args.steps
        saving = done % args.ckpt_every == 0 or done == args.steps or stop or signum
        # collectives first, reached by every rank on the same steps; then rank 0's work, which calls none
        if logged or evaluated or saving or pictured:
            check_finite(first_bad, world, ckpt, kept)
        if logged:
            record = reduce_metrics(sums, seen // args.batch_size, counts, world, done, lr, seen / (time.time() - t0))
        rngs = run_folder.all_rng_states(world) if saving else None
        held = in_eval_mode(stage.model, stage.heldout) if evaluated and rank == 0 else {}
        if held:
            log.info(f"step {done} held-out: " + ", ".join(f"{key[8:]} {value:.4g}" for key, value in held.items()))
        if logged:
            log.metrics({**record, **held})
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}",
                            **heldout.postfix(held))
        elif held:
            log.metrics({"step": done, **held})
        if rank == 0 and pictured:
            images, per_row = in_eval_mode(stage.model, stage.pictures)
            plumbing.save_pictures(images, per_row, args.out, done)
        if saving and rank == 0:
            run_folder.save(stage, args, done, ckpt, rngs, kept)
        if saving:
            kept, log.last_good = done, f"the last good checkpoint is {ckpt} at step {done}"
        if evaluated or pictured or saving:
            plumbing.barrier()          # the others wait here, not in the next step's gradient all-reduce
        if logged:
            sums, counts, t0, seen = {}, torch.zeros_like(counts), time.time(), 0
        if stop and not signum:
            log.info(f"stopped after {args.stop_after} steps at step {done}; continue with --resume")
        if stop or signum:
            break
    bar.close()
    return done, signum


def in_eval_mode(model, work):
    """work() with `model` in eval mode (no dropout, no clustering update: no collective) and without gradients,
    its mode restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return work()
    finally:
        model.train(was)


def collate(items):
    """Stack (image or codes, label) items; labels as int64."""
    return (torch.stack([torch.as_tensor(item) for item, _ in items]),
            torch.tensor([int(label) for _, label in items]))


def check_finite(first_bad, world, ckpt_path, kept):
    """Stop every process when any saw a non-finite loss since the last check, keeping the last good checkpoint
    untouched (FloatingPointError naming the first such step)."""
    bad = torch.where(first_bad < 0, torch.iinfo(torch.long).max, first_bad)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MIN)
    if int(bad) != torch.iinfo(torch.long).max:
        kept = (f"the last good checkpoint is {ckpt_path}, step {kept}" if os.path.exists(ckpt_path)
                else "no checkpoint yet")
        raise FloatingPointError(f"non-finite loss at step {int(bad)}; stopping ({kept}). Try a lower --lr.")


def reduce_metrics(sums, n_steps, counts, world, step, lr, img_per_s):
    """Mean of each summed metric over steps and processes, plus codebook usage; a JSON-ready dict."""
    keys = sorted(sums)
    packed = torch.stack([torch.tensor(float(n_steps)).to(counts)] + [sums[key].to(counts) for key in keys])
    packed = torch.cat([packed, counts])                   # one all_reduce for all of them
    if world > 1:
        dist.all_reduce(packed)
    steps, values, counts = packed[0], packed[1:1 + len(keys)], packed[1 + len(keys):]
    record = {"step": step, **{key: float(value / steps) for key, value in zip(keys, values)}, "lr": lr,
              "img_per_s": img_per_s}
    if counts.sum() > 0:
        record["codebook_usage"], record["codebook_perplexity"] = heldout.codebook_metrics(counts)
    return record


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
