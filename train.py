"""Training: tokenizer stage 1 (causal decoder), stage 2 (bidirectional decoder), and the generator.

    python train.py --stage 1           # tiny tokenizer on the built-in shapes, 2 CPU cores, minutes
    python train.py --stage 2           # stage 2 from the stage-1 checkpoint (the decoder carries over)
    python train.py --stage ar          # tiny generator on ten-crop pre-tokenized codes
    torchrun --nproc_per_node=8 train.py --stage 1 --preset alitok --data /imagenet/train ...
    python train.py --stage 1 --preset alitok --help    # every flag with the paper's value

Each step computes what the original training code computes (reference/golden/train_*.npz): optimizers,
loss arithmetic in float32, the discriminator, the clustering codebook update, the stage-2 start from the
stage-1 decoder. One file holds model, optimizers, discriminator, step, RNG states and config; it is written
atomically, and `--resume` continues bit for bit (data order and augmentations are functions of (seed,
step)).
"""
import argparse
import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import alitok
import data
import fid
import perceptual
import plumbing
import weights

# ----------------------------------------------------------------------------------------------------
# Recipes: the paper's settings (reference/ALITOK_SPEC.md, "Training, as the original code does it") and ours
# ----------------------------------------------------------------------------------------------------

# Tokenizer: AdamW 1e-4 with torch's defaults (betas 0.9/0.999, weight decay 0.01), no clipping, 10k warm-up.
# Stage 1: ~50k steps LPIPS 1.0 + ConvNeXt 0.1, ~200k ConvNeXt 1.0, ~100k with the GAN; stage 2 the same with
# 50k + 150k + 100k and no new warm-up. The original lowered the rate by hand (1e-4 -> 2e-5 -> 2e-6 over the
# last two phases); one cosine from the end of the LPIPS phase to 2e-6 approximates it (2.6e-5 at the GAN
# start of stage 1). The released run's batch is not given; 256 is ours.
TOKENIZER = dict(batch_size=256, lr=1e-4, lr_min=2e-6, weight_decay=0.01, grad_clip=0.0, lpips_until=50_000,
                 decay_start=50_000, weight_init="original", log_every=100, image_every=5_000, ckpt_every=5_000,
                 eval_every=5_000)
# The tiny tokenizer starts from PyTorch's default init: from the original's (std 0.02 everywhere, a 1x1
# output conv included) a model this small stays for hundreds of steps, with some seeds the whole run, on the
# plateau of the mean image (~12 dB on CIFAR-10), which would decide any comparison of tiny runs.
TINY_TOKENIZER = dict(batch_size=32, steps=1500, lr=1e-3, lr_min=1e-4, warmup=100, decay_start=100,
                      weight_decay=0.01, grad_clip=0.0, weight_init="torch", lpips_until=0, gan_start=-1,
                      log_every=25, image_every=250, ckpt_every=250, eval_every=250)
# Generator: AdamW 4e-4, betas (0.9, 0.96), decay 0.03 on matrices, clip 1.0, global batch 2048, 62.5k warm-up
# from 0, then cosine to 1e-5.
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
DISCRIMINATORS = {"alitok": {}, "tiny": dict(base_channels=16, pool_size=4)}
# LPIPS early in each stage avoids blank or noisy reconstructions (the original's phase weights).
EARLY, LATE = dict(lpips=1.0, convnext=0.1), dict(lpips=0.0, convnext=1.0)
FROZEN = ("encoder", "quantize", "latent_tokens")    # stage 2 freezes by name substring, as the original
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


def parse_args(argv=None):
    """The command line. --stage and --preset are read first, so that every schedule flag's default (and
    its --help) is that recipe's, next to the paper's value."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--stage", choices=list(RECIPES))
    first.add_argument("--preset", default="tiny")
    known, _ = first.parse_known_args(argv)
    stage = known.stage or "1"
    recipe = RECIPES[stage].get(known.preset, RECIPES[stage]["tiny"])
    paper = RECIPES[stage][known.preset if known.preset in RECIPES[stage] and known.preset != "tiny"
                           else PAPER[stage]]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(RECIPES), help="what to train")
    p.add_argument("--preset", default="tiny", choices=list(RECIPES[stage]),
                   help="recipe and model size: tiny (ours, CPU minutes) or the paper's (default: tiny)")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in), an ImageNet-layout folder, or an npz")
    p.add_argument("--n-images", type=int, default=None, help="use this many images of the source")
    p.add_argument("--eval-images", type=int, default=1000,
                   help="held-out images evaluated (the source's test split, else 2%% training never sees)")
    p.add_argument("--inception", default=None, metavar="PATH",
                   help=f"tokenizer stages: FID Inception weights for the held-out rFID (default: the cached "
                        f"{weights.INCEPTION_WEIGHTS} if present; training never downloads it)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="abort if more than this fraction of a folder's images is unreadable")
    p.add_argument("--out", default=os.path.join("runs", {"1": "stage1", "2": "stage2", "ar": "ar"}[stage]),
                   help="run folder (default: %(default)s)")
    g = p.add_argument_group(f"schedule (defaults: the {known.preset} recipe; paper: the {PAPER[stage]} one)")
    for key, kind, what in SCHEDULE:
        if key in recipe:
            g.add_argument("--" + key.replace("_", "-"), type=kind, default=recipe[key],
                           help=f"{what} (default %(default)s; paper {paper[key]})")
    g.add_argument("--seed", type=int, default=0)
    (add_tokenizer_flags if stage in ("1", "2") else add_generator_flags)(p, stage)
    s = p.add_argument_group("system")
    s.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt if it exists")
    s.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and exit after this many steps of this run (time-limited jobs)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="autocast of the trained model (losses stay float32); default bf16 on cuda, else fp32")
    s.add_argument("--workers", type=int, default=0, help="DataLoader workers per process")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--offline", action="store_true", help=f"never download weight files (as {weights.OFFLINE_ENV}=1)")
    return p.parse_args(argv)


def add_tokenizer_flags(p, stage):
    """Loss weights, loss-network files, and the stage's model switches."""
    l = p.add_argument_group("tokenizer losses")
    l.add_argument("--perceptual-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the ConvNeXt-S perceptual loss (default: on, off for the tiny preset)")
    l.add_argument("--lpips-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="the LPIPS loss (default: on, off for the tiny preset)")
    l.add_argument("--perceptual-weights", default=None, help="torchvision convnext_small-0c510722.pth (default: "
                   "the torch hub cache's copy, downloaded on first use)")
    l.add_argument("--lpips-weights", nargs=2, default=None, metavar=("VGG16", "LIN"),
                   help="torchvision vgg16-397923af.pth and LPIPS v0.1 vgg.pth (default: cached, as above)")
    l.add_argument("--aux-weight", type=float, default=10.0, help="aux prefix loss weight, times n_prefix/n_image "
                   "(paper 10)")
    l.add_argument("--disc-weight", type=float, default=0.1, help="discriminator hinge loss weight (paper 0.1)")
    l.add_argument("--gan-weight", type=float, default=0.1 * 0.05,
                   help="tokenizer adversarial weight (paper 0.005)")
    if stage == "1":
        a = p.add_argument_group("ablations (stage 1)")
        a.add_argument("--decoder", choices=["causal", "bidirectional"], default="causal",
                       help="stage-1 decoder attention; bidirectional is the paper's baseline tokenizer")
        a.add_argument("--no-prefix", action="store_true", help="no prefix tokens (and so no aux head)")
        a.add_argument("--no-aux", action="store_true", help="no auxiliary prefix loss")
    else:
        a = p.add_argument_group("stage 2")
        a.add_argument("--init", default=os.path.join("runs", "stage1", "ckpt.pt"),
                       help="the stage-1 checkpoint (default: %(default)s)")
        a.add_argument("--fresh-decoder", action="store_true",
                       help="ablation: a fresh decoder (the paper's carries the stage-1 decoder over)")


def add_generator_flags(p, stage):
    """The frozen tokenizer, the codes file and the generator's regularisation."""
    a = p.add_argument_group("generator")
    a.add_argument("--tokenizer", default=os.path.join("runs", "stage2", "tokenizer.pt"),
                   help="tokenizer checkpoint (default: %(default)s)")
    a.add_argument("--codes", default=None,
                   help="pre-tokenized codes npz, made if missing (default: <out>/codes.npz)")
    a.add_argument("--dropout", type=float, default=None, help="attention/FFN/residual dropout (paper 0.1)")
    a.add_argument("--token-dropout", type=float, default=None, help="input embedding dropout (paper 0.1)")
    a.add_argument("--class-dropout", type=float, default=None, help="null-class probability (paper 0.1)")


# ----------------------------------------------------------------------------------------------------
# Pure pieces: learning rate, parameter groups, optimizers
# ----------------------------------------------------------------------------------------------------

def lr_at(step, args):
    """The rate at a step: linear warm-up from 0 (step / warmup, as the original), held at --lr until
    --decay-start, then cosine to --lr-min at --steps."""
    if step < args.warmup:
        return args.lr * step / args.warmup
    start = max(args.warmup, args.decay_start)
    if step < start:
        return args.lr
    t = min(1.0, (step - start) / max(1, args.steps - start))
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizers, lr):
    """Every optimizer at the schedule's current rate (the discriminator's too, as the original)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr


def trainable(model):
    """The parameters that train (stage 2 leaves the frozen ones out of its optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]


def tokenizer_optimizer(params, args):
    """The original's tokenizer and discriminator optimizer: AdamW with torch's defaults besides the rate
    (betas 0.9/0.999, eps 1e-8, --weight-decay 0.01 on every tensor)."""
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def generator_param_groups(model, weight_decay):
    """The original's AdamW groups: no decay for tensors with ndim < 2 or a name containing any of
    NO_WEIGHT_DECAY (embeddings, norms, biases), `weight_decay` for the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(s in name for s in NO_WEIGHT_DECAY) else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def generator_optimizer(model, args):
    """AdamW with betas (0.9, 0.96) over generator_param_groups."""
    return torch.optim.AdamW(generator_param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.96))


def update(opt, params, loss, clip):
    """Backward, clip the gradient norm to `clip` (0: no clipping), one optimizer step; the norm before
    clipping."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    opt.step()
    return norm


def wrap(module, device, world):
    """DDP under torchrun, the module itself in one process."""
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module


# ----------------------------------------------------------------------------------------------------
# Tokenizer: models of each stage, the loss arithmetic, the step
# ----------------------------------------------------------------------------------------------------

def stage1_tokenizer(args):
    """The stage-1 tokenizer with the requested ablations (decoder attention, prefix, aux loss)."""
    kw = dict(causal=args.decoder == "causal")
    if args.no_prefix:
        kw.update(n_prefix=0)
    if args.no_aux:
        kw.update(aux_head=False)
    return init_weights(alitok.Tokenizer(alitok.tokenizer_config(args.preset, 1, **kw)), args.weight_init)


def init_weights(module, scheme):
    """The tokenizer's init (it is built with the original's): 'original' keeps it, 'torch' gives every Linear and
    Conv PyTorch's default init."""
    if scheme not in ("original", "torch"):
        raise ValueError(f"--weight-init {scheme!r}: expected 'original' or 'torch'")
    if scheme == "torch":
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.reset_parameters()
    return module


def carry_over(model, state, names=None):
    """Load every tensor of `state` whose name and shape match model's (only names starting with one of
    `names`, if given), as the original's stage-2 start; returns (loaded, new, dropped) name lists."""
    own = model.state_dict()
    loaded = [k for k, v in own.items() if k in state and state[k].shape == v.shape
              and (names is None or k.startswith(names))]
    new = sorted(set(own) - set(loaded), key=list(own).index)
    dropped = [k for k in state if k not in own]
    alitok.load_strict(model, {**own, **{k: state[k] for k in loaded}})
    return loaded, new, dropped


def freeze_for_stage2(model):
    """Freeze the encoder, the quantizer and the latent tokens (by name, as the original): the codes stay."""
    for name, p in model.named_parameters():
        p.requires_grad_(not any(s in name for s in FROZEN))
    return model


def stage2_tokenizer(args, log):
    """Stage 2 from the stage-1 checkpoint: every tensor whose name and shape match (encoder, codebook, the
    whole decoder trunk); only the buffer tokens and the positional table are new. (model, stage-1 file)."""
    first = alitok.read_checkpoint(args.init, "the stage-1 checkpoint (train it with `python train.py "
                                              "--stage 1`, or pass --init PATH)")
    made = (first.get("stage"), first.get("args", {}).get("preset")) if isinstance(first, dict) else None
    if made != ("1", args.preset) or "config" not in first:
        raise ValueError(f"--init {args.init} holds {describe(first)}; stage 2 of preset {args.preset} starts from "
                         f"a stage-1 run of preset {args.preset} (its <out>/ckpt.pt): pass that file with --init")
    cfg = alitok.TokenizerConfig(**first["config"])
    preset = alitok.TOKENIZER_PRESETS[args.preset]
    tok = alitok.Tokenizer(replace(cfg, **alitok.STAGES[2], n_buffer=preset.n_buffer))
    init_weights(tok.decoder, args.weight_init)                   # what carry_over does not replace
    loaded, new, dropped = carry_over(tok, first["model"], FROZEN if args.fresh_decoder else None)
    log.info(f"stage 2: {len(loaded)} tensors from {args.init}, {len(new)} new ({', '.join(new[:4])}"
             f"{' ...' if len(new) > 4 else ''}), {len(dropped)} dropped")
    return freeze_for_stage2(tok), first


def stage1_forward(model, autocast, images):
    """Stage 1: the whole tokenizer under autocast (the quantizer itself runs in float32)."""
    with autocast:
        return model(images)


def stage2_forward(model, decoder, autocast, images):
    """Stage 2: the frozen encoder and quantizer in float32 without gradients (the codes are the inference
    codes), then the decoder (DDP-wrapped under torchrun) under autocast."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        zq, codes, _ = model.quantize(model.encoder(images, model.latent_tokens))
    with autocast:
        recon, aux = decoder(zq)
    return dict(recon=recon, aux=aux, codes=codes)


def loss_weights(args, step, have_lpips):
    """The phase's loss weights: EARLY before --lpips-until (LATE throughout without the LPIPS file), the
    adversarial term from --gan-start."""
    weights = dict(EARLY if step < args.lpips_until and have_lpips else LATE)
    return dict(weights, gan=args.gan_weight if 0 <= args.gan_start <= step else 0.0)


def tokenizer_losses(out, images, nets, disc, weights, cfg, aux_weight):
    """The original's criterion, in float32 with autocast off: reconstruction (+ aux), perceptual (LPIPS
    and ConvNeXt at the phase's weights), quantizer (stage 1) and adversarial terms; their sum is "loss"."""
    convnext, lpips_net = nets
    with torch.autocast(images.device.type, enabled=False):
        recon = out["recon"].float()
        aux = None if out["aux"] is None else out["aux"].float()
        parts = {"rec": alitok.reconstruction_loss(images, dict(recon=recon, aux=aux), cfg.patch_size,
                                                   cfg.n_prefix, aux_weight)}
        if lpips_net is not None and weights["lpips"] > 0:
            parts["lpips"] = perceptual.lpips(lpips_net, recon, images)
        if convnext is not None:
            parts["convnext"] = perceptual.perceptual_loss(convnext, recon, images)
        if "lpips" in parts or "convnext" in parts:
            parts["perceptual"] = (weights["lpips"] * parts.get("lpips", 0.0)
                                   + weights["convnext"] * parts.get("convnext", 0.0))
        if "vq_loss" in out:
            parts["quantizer"] = out["vq_loss"]
        if weights["gan"] > 0:
            parts["gen_adv"] = weights["gan"] * perceptual.generator_adv_loss(disc(recon))
        parts["loss"] = sum(parts[k] for k in ("rec", "perceptual", "quantizer", "gen_adv") if k in parts)
    return parts


def discriminator_loss(disc, images, fake, weight):
    """weight * hinge loss of D on real images and detached reconstructions (one pass, float32, autocast
    off); (loss, real logits, fake logits)."""
    with torch.autocast(images.device.type, enabled=False):
        real, fake = disc(torch.cat([images, fake.detach().float()])).chunk(2)
        return weight * perceptual.hinge_d_loss(real, fake), real, fake


@dataclass
class TokenizerTraining:
    """What a tokenizer step needs."""
    model: alitok.Tokenizer
    forward: Callable                      # images -> outputs: stage1_forward or stage2_forward, bound
    opt: torch.optim.Optimizer             # AdamW over the trainable tensors
    nets: tuple                            # (ConvNeXt-S or None, LPIPS or None), frozen
    args: argparse.Namespace               # loss weights and phase steps
    disc: torch.nn.Module = None           # the discriminator, or None without a GAN phase
    disc_opt: torch.optim.Optimizer = None
    disc_ddp: torch.nn.Module = None       # the discriminator as the D step calls it (DDP under torchrun)


def tokenizer_training(model, forward, nets, args, disc=None, disc_ddp=None):
    """A TokenizerTraining with the original's optimizers for the model and the discriminator."""
    disc_opt = tokenizer_optimizer(disc.parameters(), args) if disc is not None else None
    return TokenizerTraining(model, forward, tokenizer_optimizer(trainable(model), args), nets, args, disc,
                             disc_opt, disc_ddp or disc)


def tokenizer_step(t, batch, step):
    """One step of the original's loop on a batch (images, labels): in the GAN phase discriminator and
    tokenizer steps alternate."""
    images, a = batch[0], t.args
    if t.disc is not None and 0 <= a.gan_start <= step and (step - a.gan_start) % 2 == 1:
        return discriminator_step(t, images)
    out = t.forward(images)
    parts = tokenizer_losses(out, images, t.nets, t.disc, loss_weights(a, step, t.nets[1] is not None),
                             t.model.config, a.aux_weight)
    parts["grad_norm"] = update(t.opt, trainable(t.model), parts["loss"], a.grad_clip)
    parts = {k: torch.as_tensor(v).detach() for k, v in parts.items()}
    parts["psnr"] = -10 * torch.log10(F.mse_loss(out["recon"].detach().float(), images))
    return {**parts, "codes": out["codes"]}


def discriminator_step(t, images):
    """A discriminator update on this batch and its reconstruction (the tokenizer's train-mode forward
    runs, so the clustering update does too, as in the original)."""
    with torch.no_grad():
        fake = t.forward(images)["recon"]
    loss, real, fake_logits = discriminator_loss(t.disc_ddp, images, fake, t.args.disc_weight)
    update(t.disc_opt, list(t.disc.parameters()), loss, t.args.grad_clip)
    no_codes = torch.zeros(0, dtype=torch.long, device=images.device)
    return {"loss": loss.detach(), "d_loss": loss.detach(), "d_real": real.detach().mean(),
            "d_fake": fake_logits.detach().mean(), "codes": no_codes}


def loss_file(name, path, args, switch_off):
    """The path of a loss network's standard weight file (weights.standard_weights: an explicit path wins); the
    error, if it cannot be had, also says how to train without that loss."""
    try:
        return weights.standard_weights(name, path, args.offline, progress=not args.no_progress)
    except (OSError, ValueError) as error:
        kind = ValueError if isinstance(error, ValueError) else FileNotFoundError
        raise kind(f"{error}. To train without this loss, pass {switch_off}.") from None


def loss_networks(args, device, log):
    """ConvNeXt-S and LPIPS, each on by --perceptual-loss / --lpips-loss (default: on, except for the tiny
    preset, which needs no download; a weights path given switches it on), frozen."""
    wanted = lambda switch, path: switch if switch is not None else path is not None or args.preset != "tiny"
    convnext = lp = None
    if wanted(args.perceptual_loss, args.perceptual_weights):
        path = loss_file(weights.CONVNEXT_WEIGHTS, args.perceptual_weights, args, "--no-perceptual-loss")
        convnext = perceptual.load_convnext(path).to(device)
    if wanted(args.lpips_loss, args.lpips_weights):
        vgg, lin = args.lpips_weights or (None, None)
        lp = perceptual.load_lpips(loss_file(weights.VGG16_WEIGHTS, vgg, args, "--no-lpips-loss"),
                                   loss_file(weights.LPIPS_WEIGHTS, lin, args, "--no-lpips-loss")).to(device)
    off = [name for name, net in (("ConvNeXt-S perceptual", convnext), ("LPIPS", lp)) if net is None]
    if off:
        log.info(f"{' and '.join(off)} loss off: pass --perceptual-loss / --lpips-loss to use them (their "
                 f"standard weights are downloaded on first use into {weights.weights_cache()})")
    return convnext, lp


def setup_stage1(args, device, world, autocast, log):
    """Stage 1: a new tokenizer (with the ablations asked for), trained end to end."""
    model = stage1_tokenizer(args).to(device)
    forward = functools.partial(stage1_forward, wrap(model, device, world), autocast)
    return tokenizer_run(args, model, forward, None, device, world, log, finish=lambda: None, autocast=autocast)


def setup_stage2(args, device, world, autocast, log):
    """Stage 2: the tokenizer and discriminator of the stage-1 checkpoint, the decoder trained on the frozen
    codes; at the end the tokenizer in the released inference layout (<out>/tokenizer.pt)."""
    model, first = stage2_tokenizer(args, log)
    model = model.to(device)
    forward = functools.partial(stage2_forward, model, wrap(model.decoder, device, world), autocast)
    path, disc_state = os.path.join(args.out, "tokenizer.pt"), first.get("modules", {}).get("discriminator")
    return tokenizer_run(args, model, forward, disc_state, device, world, log,
                         finish=lambda: plumbing.save_checkpoint(alitok.checkpoint(model), path), autocast=autocast)


def tokenizer_run(args, model, forward, disc_state, device, world, log, finish, autocast):
    """What the loop needs for a tokenizer stage: loss networks, the discriminator (from disc_state if given),
    the optimizers, the images in the tokenizer's training view, and the held-out images (under autocast)."""
    disc = None
    if args.gan_start >= 0:
        disc = perceptual.Discriminator(**DISCRIMINATORS[args.preset]).to(device)
        if disc_state is not None:
            alitok.load_strict(disc, disc_state, source=args.init)
            log.info(f"stage 2: the discriminator carries over from {args.init}")
    t = tokenizer_training(model, forward, loss_networks(args, device, log), args, disc,
                           disc and wrap(disc, device, world))
    dataset, heldout = data.heldout_split(args.data, model.config.image_size, seed=args.seed, n_images=args.n_images,
                                          n_heldout=args.eval_images, max_bad_fraction=args.max_bad_fraction)
    fixed = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])   # ADM centre crops
    optimizers = {"model": t.opt} | ({"discriminator": t.disc_opt} if disc is not None else {})
    return Run(model, functools.partial(tokenizer_step, t), optimizers, dataset, model.config.codebook_size,
               pictures=functools.partial(reconstructions, model, fixed), finish=finish,
               modules={"discriminator": disc} if disc is not None else {},
               heldout=functools.partial(tokenizer_heldout, model, data.heldout_images(heldout)[0], autocast,
                                         rfid_network(args, device, log)))


def rfid_network(args, device, log):
    """The FID Inception for held-out rFID: --inception, else the cached standard file; None (said once) if
    neither is there. Only rank 0 evaluates."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    net, why = fid.available_inception(args.inception, device)
    if net is None:
        log.info(f"held-out rFID off: {why}")
        return None
    return {"net": net}


def reconstructions(model, fixed):
    """Originals above their reconstructions (eval mode: no codebook update); (images, images per row)."""
    recon = model(fixed.to(model.latent_tokens.device))["recon"].float().cpu()
    return torch.cat([fixed, recon]), len(fixed)


# ----------------------------------------------------------------------------------------------------
# Generator: the frozen tokenizer, ten-crop codes, the step
# ----------------------------------------------------------------------------------------------------

@dataclass
class GeneratorTraining:
    """What a generator step needs."""
    model: alitok.Generator
    ddp: torch.nn.Module                   # the model as the step calls it (DDP under torchrun)
    opt: torch.optim.Optimizer             # generator_optimizer
    autocast: object
    grad_clip: float


def generator_step(g, batch, step):
    """One generator update on a batch (codes, classes): next-token cross-entropy (mean over all tokens),
    clip, AdamW; loss, token accuracy and the gradient norm before clipping."""
    codes, classes = batch
    with g.autocast:
        logits = g.ddp(codes, classes)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1))
    norm = update(g.opt, list(g.model.parameters()), loss, g.grad_clip)
    acc = (logits.detach().argmax(-1) == codes).float().mean()
    return {"loss": loss.detach(), "acc": acc, "grad_norm": norm.detach(), "codes": codes}


def load_frozen_tokenizer(path, device):
    """The tokenizer whose codes the generator learns, frozen (eval mode)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage ar needs a tokenizer checkpoint: {path} not found. Train one (`python "
                                f"train.py --stage 1` then `--stage 2`) or pass --tokenizer AliTok.pth (the "
                                f"released tokenizer).")
    saved = alitok.read_checkpoint(path, "tokenizer checkpoint (--tokenizer)")
    try:
        tok = alitok.load_tokenizer(saved)
    except ValueError as error:
        raise ValueError(f"--tokenizer {path} is not a tokenizer checkpoint ({str(error)[:300]}); pass the "
                         f"stage-2 tokenizer.pt of `python train.py --stage 2` or the released AliTok.pth") from None
    return tok.to(device).requires_grad_(False)


def setup_generator(args, device, world, autocast, log):
    """Stage ar: ten-crop codes of the frozen tokenizer (made once if missing), the generator, its optimizer."""
    tok = load_frozen_tokenizer(args.tokenizer, device)
    codes = args.codes or os.path.join(args.out, "codes.npz")
    if not os.path.exists(codes):
        log.info(f"pre-tokenizing {args.data} with ten-crop into {codes}")
        images, _ = data.heldout_split(args.data, int(tok.config.image_size * data.TEN_CROP_SCALE), seed=args.seed,
                                       n_images=args.n_images, max_bad_fraction=args.max_bad_fraction)
        data.pretokenize(tok, images, codes, batch_size=64, device=device, progress=not args.no_progress)
    dataset = data.CodesDataset(codes)
    overrides = {k: getattr(args, k) for k in ("dropout", "token_dropout", "class_dropout")
                 if getattr(args, k) is not None}
    cfg = alitok.generator_config(args.preset, tokenizer=tok.config, num_classes=dataset.num_classes, **overrides)
    model = alitok.Generator(cfg).to(device)
    g = GeneratorTraining(model, wrap(model, device, world), generator_optimizer(model, args), autocast,
                          args.grad_clip)
    # the path finds the tokenizer again; the fingerprint tells sample.py whether a tokenizer is that one
    saved = {"tokenizer": os.path.abspath(args.tokenizer),
             "tokenizer_fingerprint": alitok.codebook_fingerprint(tok)}
    path = os.path.join(args.out, "generator.pt")
    held = heldout_codes(tok, args, device)
    return Run(model, functools.partial(generator_step, g), {"model": g.opt}, dataset, cfg.codebook_size,
               pictures=functools.partial(samples, model, tok), saved=saved,
               finish=lambda: plumbing.save_checkpoint({**alitok.checkpoint(model), **saved}, path),
               heldout=functools.partial(generator_heldout, model, *held, autocast))


def samples(model, tok):
    """Eight samples per class (the first 16 classes), decoded; (images, images per row)."""
    classes = torch.arange(model.config.num_classes).repeat_interleave(8)[:8 * 16]
    codes = model.generate(classes.to(model.output.weight.device), seeds=list(range(len(classes))))
    return tok.decode(codes).float().cpu(), 8


# ----------------------------------------------------------------------------------------------------
# The training loop: the same for every stage
# ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop needs from a stage's setup."""
    model: torch.nn.Module                 # the trained model: the checkpoint's "model" and "config"
    train_step: Callable                   # ((x, y), step) -> metrics; "loss", and the step's "codes"
    optimizers: dict                       # name -> optimizer; all follow the rate schedule
    dataset: torch.utils.data.Dataset      # items (index, key): the key seeds the item's augmentation
    codebook_size: int
    pictures: Callable                     # () -> (images [N, 3, H, W] in [0, 1], images per row)
    finish: Callable                       # () -> None: the stage's final file (rank 0)
    modules: dict = field(default_factory=dict)   # other modules saved and resumed by name
    saved: dict = field(default_factory=dict)     # other checkpoint entries
    heldout: Callable = None               # () -> {"heldout_<metric>": float} on the held-out split, eval mode


SETUPS = {"1": setup_stage1, "2": setup_stage2, "ar": setup_generator}


def main(argv=None):
    """Train one stage; 0 when done or stopped by --stop-after, 128 + the signal number when SIGTERM/SIGINT
    stopped it (after writing the checkpoint)."""
    args = parse_args(argv)
    rank, world, device = plumbing.setup_distributed(args.device)
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) must divide by the {world} processes")
    make_run_folder(args.out)
    ckpt = os.path.join(args.out, "ckpt.pt")
    # rank 0 holds the folder for the whole run: a second run on it is refused, naming this process
    with plumbing.RunFolderLock(args.out) if rank == 0 else contextlib.nullcontext():
        log = Logger(args.out, rank)
        saved = read_resumable(ckpt, args, log) if args.resume else None   # checked before any setup
        precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
        torch.manual_seed(args.seed + rank)
        run = SETUPS[args.stage](args, device, world, plumbing.autocast(device, precision), log)
        n_params = sum(p.numel() for p in trainable(run.model))
        log.info(f"stage {args.stage}: {n_params / 1e6:.2f}M trainable parameters, {len(run.dataset)} training "
                 f"items, global batch {args.batch_size} = {world} x {args.batch_size // world}, {device}, {precision}")
        start = resume(run, saved, ckpt, rank, world, log) if saved is not None else 0
        if start >= args.steps:
            log.info(f"{args.out}: already trained to step {start} (--steps {args.steps}); nothing to do")
        with plumbing.StopSignals() as signals:
            done, signum = train_loop(run, args, start, ckpt, (rank, world, device), log, signals)
        if signum:
            log.info(f"received {signal.Signals(signum).name} at step {done}: wrote {ckpt}; continue with --resume")
        elif done >= args.steps and rank == 0:
            run.finish()
    plumbing.barrier()
    if plumbing.is_distributed():
        dist.destroy_process_group()
    return 128 + signum if signum else 0


def train_loop(run, args, start, ckpt, where, log, signals):
    """Steps start..--steps-1 with logs, pictures and checkpoints; stops early at --stop-after or at a stop
    signal (checkpoint written either way). (steps done, the agreed signal number or 0)."""
    rank, world, device = where
    done, signum = start, 0
    batches = data.StepBatches(len(run.dataset), args.batch_size, args.seed, start, args.steps, rank, world)
    loader = iter(torch.utils.data.DataLoader(run.dataset, batch_sampler=batches, num_workers=args.workers,
                                              pin_memory=device.type == "cuda", collate_fn=collate,
                                              generator=torch.Generator()))  # leaves the global RNG alone
    sums, counts, t0, seen = {}, torch.zeros(run.codebook_size, device=device), time.time(), 0
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=rank != 0 or args.no_progress,
               desc=f"stage {args.stage}", dynamic_ncols=True)
    for step in bar:
        x, y = (t.to(device, non_blocking=True) for t in next(loader))
        lr = lr_at(step, args)
        set_lr(run.optimizers.values(), lr)
        metrics = run.train_step((x, y), step)
        counts += torch.bincount(metrics.pop("codes").flatten(), minlength=run.codebook_size)
        signum = check_finite(metrics["loss"], step, ckpt, world, signals.received)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v.float()
        seen, done = seen + x.shape[0] * world, step + 1
        held = heldout_metrics(run, rank, done, args, log)
        if done % args.log_every == 0 or done == args.steps:
            record = reduce_metrics(sums, seen // args.batch_size, counts, world, done, lr, seen / (time.time() - t0))
            log.metrics({**record, **held})
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{record['img_per_s']:.0f}",
                            **heldout_postfix(held))
            sums, counts, t0, seen = {}, torch.zeros_like(counts), time.time(), 0
        elif held:
            log.metrics({"step": done, **held})
        if rank == 0 and (done % args.image_every == 0 or done == args.steps):
            save_pictures(run, args.out, done)
        stop = args.stop_after is not None and done - start >= args.stop_after
        if done % args.ckpt_every == 0 or done == args.steps or stop or signum:
            save(run, args, done, ckpt, rank, world)
        if stop and not signum:
            log.info(f"stopped after {args.stop_after} steps at step {done}; continue with --resume")
        if stop or signum:
            break
    bar.close()
    return done, signum


def collate(items):
    """Stack (image or codes, label) items; labels as int64."""
    return torch.stack([torch.as_tensor(a) for a, _ in items]), torch.tensor([int(b) for _, b in items])


def check_finite(loss, step, ckpt_path, world, signum=None):
    """Stop every process on a NaN or infinite loss, keeping the last good checkpoint untouched; returns the
    stop signal any process has received (0: none), agreed by all in the same all_reduce."""
    flags = torch.tensor([0.0 if torch.isfinite(loss) else 1.0, float(signum or 0)], device=loss.device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item() > 0:
        kept = f"the last good checkpoint is {ckpt_path}" if os.path.exists(ckpt_path) else "no checkpoint yet"
        raise FloatingPointError(f"non-finite loss at step {step}; stopping ({kept}). Try a lower --lr.")
    return int(flags[1].item())


def codebook_metrics(counts):
    """Fraction of codes used and perplexity exp(H) of a histogram of code counts."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


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


# ----------------------------------------------------------------------------------------------------
# Held-out evaluation (nanoGPT's estimate_loss): images training never sees, every --eval-every steps
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def tokenizer_heldout(model, images, autocast, inception=None, batch_size=64):
    """Held-out reconstruction of uint8 images [N, 3, S, S]: PSNR in dB (mean over images, the reconstruction
    rounded to uint8 as a saved picture), usage (0..1) and perplexity of the held-out codes; with `inception`
    ({"net": FID Inception}, where the originals' statistics are kept) also rFID of the reconstructions."""
    device = model.latent_tokens.device
    counts, psnr, recons = torch.zeros(model.config.codebook_size, device=device), [], []
    for x in images.split(batch_size):
        x = x.to(device).float()
        with autocast:
            out = model(x / 255)
        recon = out["recon"].float().clamp(0, 1).mul(255).round()
        mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnr.append(10 * torch.log10(255.0 ** 2 / mse))
        counts += torch.bincount(out["codes"].flatten(), minlength=len(counts))
        recons.append(recon.to(torch.uint8).permute(0, 2, 3, 1).cpu())
    usage, perplexity = codebook_metrics(counts)
    record = {"heldout_psnr": float(torch.cat(psnr).mean()), "heldout_codebook_usage": usage,
              "heldout_codebook_perplexity": perplexity}
    if inception is not None:
        pool3 = lambda nhwc: fid.extract(inception["net"], nhwc.numpy(), progress=False)["pool3"]
        if "real" not in inception:
            inception["real"] = fid.statistics(pool3(images.permute(0, 2, 3, 1)))
        record["heldout_rfid"] = fid.frechet_distance(*inception["real"], *fid.statistics(pool3(torch.cat(recons))))
    return record


@torch.no_grad()
def heldout_codes(tok, args, device, batch_size=64):
    """(codes int64 [N, T], labels int64 [N]): the ADM centre crops of --eval-images held-out images, encoded
    once by the frozen tokenizer."""
    _, heldout = data.heldout_split(args.data, tok.config.image_size, seed=args.seed, n_heldout=args.eval_images,
                                    max_bad_fraction=args.max_bad_fraction)
    images, labels = data.heldout_images(heldout)
    codes = torch.cat([tok.encode(x.to(device).float() / 255).cpu() for x in images.split(batch_size)])
    return codes, labels


@torch.no_grad()
def generator_heldout(model, codes, labels, autocast, batch_size=64):
    """Held-out next-token cross-entropy (nats per token) and accuracy (0..1) by teacher forcing on codes
    [N, T] with their classes (eval mode: no dropout): over all tokens, the prefix tokens and the image tokens."""
    device, n_prefix = model.output.weight.device, model.config.n_prefix
    nll, hit = [], []
    for c, y in zip(codes.split(batch_size), labels.split(batch_size)):
        c, y = c.to(device), y.to(device)
        with autocast:
            logits = model(c, y).float()
        nll.append(F.cross_entropy(logits.flatten(0, 1), c.flatten(), reduction="none").view(c.shape).cpu())
        hit.append((logits.argmax(-1) == c).float().cpu())
    nll, hit = torch.cat(nll), torch.cat(hit)                  # [N, T]
    record = {}
    for part, tokens in (("", slice(None)), ("prefix_", slice(0, n_prefix)), ("image_", slice(n_prefix, None))):
        if nll[:, tokens].numel():
            record[f"heldout_{part}loss"] = float(nll[:, tokens].mean())
            record[f"heldout_{part}acc"] = float(hit[:, tokens].mean())
    return record


def heldout_metrics(run, rank, step, args, log):
    """The stage's held-out metrics, by rank 0 in eval mode, every --eval-every steps and at the last step;
    {} on other ranks and steps."""
    if run.heldout is None or rank != 0 or not (step % args.eval_every == 0 or step == args.steps):
        return {}
    was = run.model.training
    run.model.eval()
    held = run.heldout()
    run.model.train(was)
    log.info(f"step {step} held-out: " + ", ".join(f"{k[8:]} {v:.4g}" for k, v in held.items()))
    return held


def heldout_postfix(held):
    """The progress line's held-out entry: PSNR for a tokenizer, next-token loss for the generator."""
    key = next((k for k in ("heldout_psnr", "heldout_loss") if k in held), None)
    return {} if key is None else {key.replace("heldout_", "ho_"): f"{held[key]:.4g}"}


# ----------------------------------------------------------------------------------------------------
# Checkpoints, RNG states, logs, pictures
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


def save(run, args, step, path, rank, world):
    """The whole training state at `step`, written atomically by rank 0 (AdamW moments included)."""
    rngs = all_rng_states(world)
    if rank == 0:
        plumbing.save_checkpoint({
            "stage": args.stage, "step": step, "config": asdict(run.model.config), "model": run.model.state_dict(),
            "modules": {k: m.state_dict() for k, m in run.modules.items()},
            "optimizers": {k: o.state_dict() for k, o in run.optimizers.items()},
            "rng": rngs, "args": vars(args), **run.saved}, path)


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


def describe(ck):
    """What a loaded checkpoint holds, in words for messages ("a stage-1 run of preset tiny")."""
    if isinstance(ck, dict) and "stage" in ck and isinstance(ck.get("args"), dict):
        return f"a stage-{ck['stage']} run of preset {ck['args'].get('preset')}"
    if isinstance(ck, dict) and "config" in ck and "model" in ck:
        return "a finished model file (tokenizer.pt / generator.pt), not a training state"
    return "weights without this project's training state (a released file?)"


def read_resumable(path, args, log):
    """The training state of `path` for --resume (None if there is none yet), refused before any setup when
    it is not a train.py training state or holds another stage's or preset's run."""
    if not os.path.exists(path):
        log.info(f"--resume: no {path} yet, starting from step 0")
        return None
    ck = alitok.read_checkpoint(path, "training checkpoint (--resume)")
    folder = os.path.dirname(path)
    if not (isinstance(ck, dict) and {"stage", "step", "args", "config", "model", "optimizers"} <= set(ck)):
        raise ValueError(f"{path} holds {describe(ck)}; --resume expects the ckpt.pt that train.py writes. "
                         f"Choose another --out, or move the file away to start afresh")
    asked = [f"{what} {mine}" for what, theirs, mine in (("stage", ck["stage"], args.stage),
             ("preset", ck["args"].get("preset"), args.preset)) if theirs != mine]
    if asked:
        raise ValueError(f"{folder} holds {describe(ck)}; you asked for {' and '.join(asked)}. Choose another "
                         f"--out, or continue it with --stage {ck['stage']} --preset {ck['args'].get('preset')}")
    return ck


def check_same_run(run, ck, path):
    """Refuse to resume a run made with other settings (model config, GAN on or off) before loading tensors."""
    config = asdict(run.model.config)
    differ = [f"{k}={ck['config'].get(k)!r} (now {v!r})" for k, v in config.items() if ck["config"].get(k) != v]
    for what, mine in (("modules", run.modules), ("optimizers", run.optimizers)):
        if set(ck[what]) != set(mine):
            differ.append(f"{what} {sorted(ck[what])} (now {sorted(mine)})")
    if differ:
        raise ValueError(f"{os.path.dirname(path)} holds {describe(ck)} made with other settings: "
                         f"{', '.join(differ)}. Resume with the flags it was made with, or choose another --out")


def resume(run, ck, path, rank, world, log):
    """Load the training state `ck` (read from `path`) into the run; the step to continue from."""
    check_same_run(run, ck, path)
    alitok.load_strict(run.model, ck["model"], source=path)
    for name, module in run.modules.items():
        alitok.load_strict(module, ck["modules"][name], source=path)
    for name, opt in run.optimizers.items():
        opt.load_state_dict(ck["optimizers"][name])
    set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
    log.info(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


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


CURVES = ("loss", "psnr", "acc", "heldout_psnr", "heldout_rfid", "heldout_loss", "heldout_acc", "lr")


@torch.no_grad()
def save_pictures(run, out, step):
    """The stage's picture grid (eval mode), as <out>/pictures_<step>.png and <out>/latest.png."""
    was = run.model.training
    run.model.eval()
    images, nrow = run.pictures()
    run.model.train(was)
    for name in (f"pictures_{step:07d}.png", "latest.png"):
        plumbing.save_grid(images, os.path.join(out, name), nrow=nrow)
    if os.path.exists(os.path.join(out, "metrics.jsonl")):      # the curves so far
        with open(os.path.join(out, "metrics.jsonl")) as f:
            plumbing.save_curves(os.path.join(out, "metrics.png"), [json.loads(line) for line in f], CURVES)


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
