"""Memory plan per preset: the largest --micro-batch each training stage can take on an 80 GB or 141 GB GPU.

Measured on the CPU with random weights (bytes do not depend on values), for tokenizer stages 1 and 2 (preset
alitok) and the generator (presets B, L, XL):
- activations: one real training step of train.py's own stage objects (TokenizerStage.step,
  GeneratorStage.step: forward, backward, AdamW) under train.py's bf16 autocast, on two accumulated
  micro-batches of 1 and 2 samples, summing per micro-batch the bytes of every storage autograd saves for
  backward, each storage once (the models' own weights and buffers are counted apart).
  The difference is the bytes per sample; the rest is fixed (mostly autocast's bf16 weight copies). A
  tokenizer step is measured in each loss phase of its recipe: LPIPS + ConvNeXt early, ConvNeXt + GAN late
  (the discriminator's own update, at odd GAN steps, is smaller); a run needs the smallest fit of its phases.
- parameters, float32 gradients and AdamW's two float32 moments of what trains; the discriminator's (built
  when the recipe has a GAN phase; counted whole in every phase); the frozen loss networks (ConvNeXt-S,
  LPIPS's VGG16) from the cached weight files, else random ones (the output says which). Nothing is downloaded.
Two departures keep it fast and true to a GPU: matmuls, convolutions and attention return zeros of their
kernel's dtype and shape without the arithmetic (ZeroKernels: a CPU without bf16 units runs bf16 matmuls
~100x slower; the tests check that the bytes are the real kernels'), and the generator's attention dropout is
off (with dropout a CPU falls back to the math kernel, which keeps three T x T matrices per layer that CUDA's
flash kernel does not; its other dropouts run).

- at other moments than the activations, beside the resident state: the optimizer step's temporaries (the peak of
  storages alive at once inside clip and AdamW's step, fused as train.py builds it on CUDA) and, for the
  generator, its picture sampling (train.sampling_copy's bfloat16 weights and bfloat16 KV cache for
  train.PICTURE_CLASSES x PICTURES_PER_CLASS images with guidance, counted on the meta device); a micro-batch
  fits only if these do too. The generator stage's frozen tokenizer (preset alitok) is resident.
Not measured, so it is an estimate: the transient peak inside backward (a layer's gradients beside
activations not yet freed), the CUDA context, allocator fragmentation, cuDNN and
cuBLAS workspaces, NCCL buffers and DDP's gradient buckets (about one more copy of the gradients). --margin of
each GPU is left for them.

usage:
  python tools/memory_plan.py                           # every stage and paper preset (minutes on 2 cores)
  python tools/memory_plan.py --stages ar --presets B --json plan.json
"""
import argparse
import contextlib
import os
import sys
import time
import weakref
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository: the pipeline's modules
sys.path.insert(0, ROOT)

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import alitok
import losses
import plumbing
import train
import weights

PRESETS = {"1": ("alitok", "tiny"), "2": ("alitok", "tiny"), "ar": ("B", "L", "XL", "tiny")}
STAGE_NAMES = {"1": "tokenizer stage 1", "2": "tokenizer stage 2", "ar": "generator"}
GPUS = {"80 GB": 80 * 10 ** 9, "141 GB": 141 * 10 ** 9}   # H100 / A100 80 GB and H200 141 GB, decimal bytes
NODE = 8                                                   # GPUs of the node the --micro-batch is chosen for
BATCHES = (1, 2)                                           # the micro-batch sizes measured
FLAG_RULES = {"--margin": "probability"}
QUIET = SimpleNamespace(info=lambda message: None)         # train's log, silenced


class SavedBytes:
    """Bytes of the storages autograd saves for backward inside the context, one entry per forward pass (a pass
    ends where backward starts reading them): each storage once (a tensor saved twice, or two views of one
    storage, count once); storages whose data_ptr is in `exclude` are left out."""

    def __init__(self, exclude=()):
        self.exclude, self.kept, self.bytes, self.in_backward = set(exclude), {}, [], True

    def pack(self, tensor):
        if self.in_backward:                 # a new forward pass
            self.kept, self.in_backward = {}, False
            self.bytes.append(0)
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.kept and storage.nbytes() > 0:
            self.kept[ptr] = storage         # held through the pass: no later storage can take its address
            self.bytes[-1] += storage.nbytes()
        return tensor

    def unpack(self, tensor):
        self.in_backward = True
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


ATEN = torch.ops.aten
HEAVY = {ATEN.mm.default, ATEN.addmm.default, ATEN.bmm.default, ATEN.baddbmm.default, ATEN.convolution.default,
         ATEN.convolution_backward.default, ATEN._scaled_dot_product_flash_attention_for_cpu.default,
         ATEN._scaled_dot_product_flash_attention_for_cpu_backward.default}


class ZeroKernels(TorchDispatchMode):
    """Matmuls, convolutions and attention (forward and backward) return zeros of the dtype, shape and strides
    their kernel gives (its meta kernel's) without the arithmetic. Autograd works above this mode and saves the
    same tensors; everything else (casts, norms, losses, AdamW) runs for real."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in HEAVY:
            return func(*args, **kwargs)
        meta = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, (args, kwargs))
        return tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).zero_()
                        if isinstance(t, torch.Tensor) else t, func(*meta[0], **meta[1]))


class PeakTemporaries(TorchDispatchMode):
    """The peak bytes of storages that ops inside the context make and that are alive at once (each counted
    until its last tensor goes); an op's outputs that are its inputs or views of them count nothing."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0

    def _free(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        made = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tree_flatten(out)[0]
                if isinstance(t, torch.Tensor)}
        for ptr, storage in made.items():
            if ptr not in given and storage.nbytes() > 0:
                self.live += storage.nbytes()
                weakref.finalize(storage, self._free, storage.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def build_stage(stage, preset, flags=()):
    """train.py's stage object for `stage` ("1", "2", "ar") and `preset` on the CPU under bf16 autocast, as
    train.py's builders make it but with random weights and no data or checkpoint files; (stage object,
    what the loss networks are)."""
    args = train.parse_args(["--stage", stage, "--preset", preset, "--offline", "--no-progress", *flags])
    autocast = plumbing.autocast("cpu", "bf16")              # train.py's autocast on a GPU, the same dtype
    if stage == "ar":
        cfg = alitok.generator_config(preset, tokenizer=alitok.tokenizer_config("tiny" if preset == "tiny" else
                                                                                "alitok"))
        model = alitok.Generator(cfg)
        for block in model.blocks:       # CUDA's flash kernel keeps no T x T matrix; a CPU's with dropout does
            block.attn.dropout = 0.0
        stage_obj = train.GeneratorStage(model, model, args, autocast)
        with torch.device("meta"):       # the frozen tokenizer, counted, never run
            stage_obj.tokenizer = alitok.Tokenizer(alitok.tokenizer_config("tiny" if preset == "tiny" else "alitok", 2))
        return stage_obj, "none (the generator has none)"
    try:
        nets, source = losses.loss_networks(args, "cpu", QUIET), "the cached weight files"
    except (OSError, ValueError):        # not cached, and no download: the same networks, random weights
        nets = tuple(net.eval().requires_grad_(False) for net in (losses.ConvNeXtSmall(), losses.LPIPS()))
        source = "random weights (their files are not cached)"
    if nets == (None, None):
        source = f"none (the {preset} recipe trains without them)"
    disc = losses.Discriminator(**train.DISCRIMINATORS[preset]) if args.gan_start >= 0 else None
    if stage == "1":
        model = train.stage1_tokenizer(args)
        return train.TokenizerStage(model, model, nets, args, autocast, disc, disc), source
    model = train.freeze_for_stage2(alitok.Tokenizer(alitok.tokenizer_config(preset, 2)))
    return train.TokenizerStage(model, model.decoder, nets, args, autocast, disc, disc, frozen_encoder=True), source


def phases(stage_obj):
    """{name: step}: the tokenizer update steps measured (the recipe's first and its first GAN step), named by
    the losses that run; the generator has one."""
    if isinstance(stage_obj, train.GeneratorStage):
        return {"next token": 0}
    args, (convnext, lpips), named = stage_obj.args, stage_obj.nets, {}
    for step in sorted({0, max(args.gan_start, 0)}):
        w = losses.loss_weights(args, step, lpips is not None)
        terms = [name for name, on in (("LPIPS", lpips is not None and w["lpips"] > 0),
                                       ("ConvNeXt", convnext is not None), ("GAN", w["gan"] > 0)) if on]
        named[" + ".join(terms) or "pixels"] = step
    return named


def micro_batch(stage_obj, size):
    """One micro-batch of `size` random samples: (images, labels) or (codes, classes)."""
    cfg = stage_obj.model.config
    if isinstance(stage_obj, train.GeneratorStage):
        return torch.randint(cfg.codebook_size, (size, cfg.n_tokens)), torch.randint(cfg.num_classes, (size,))
    return torch.rand(size, 3, cfg.image_size, cfg.image_size), torch.zeros(size, dtype=torch.long)


def saved_bytes(stage_obj, step, sizes, zero_kernels=True):
    """Bytes saved for backward by each micro-batch of one training step (stage_obj.step at `step`) on
    micro-batches of `sizes` samples (accumulated, as train.py does), the heavy kernels replaced by ZeroKernels
    unless zero_kernels is False; a list, one entry per micro-batch."""
    modules = [stage_obj.model, getattr(stage_obj, "disc", None), *getattr(stage_obj, "nets", ())]
    own = {t.untyped_storage().data_ptr() for m in modules if m is not None
           for t in [*m.parameters(), *m.buffers()]}
    with SavedBytes(exclude=own) as saved, ZeroKernels() if zero_kernels else contextlib.nullcontext():
        stage_obj.step([micro_batch(stage_obj, size) for size in sizes], step)
    if len(saved.bytes) != len(sizes):
        raise RuntimeError(f"{len(sizes)} micro-batches made {len(saved.bytes)} forward passes")
    return saved.bytes


def resident_bytes(stage_obj):
    """{params, grads, adamw, discriminator, loss_nets, tokenizer: bytes}: a gradient and two AdamW moments as large
    as each trained (float32) tensor; the discriminator's weights, gradients and moments summed into one entry;
    the frozen networks: the loss networks, the generator stage's tokenizer."""
    trained, disc = train.trainable(stage_obj.model), getattr(stage_obj, "disc", None)
    d = [] if disc is None else list(disc.parameters())
    nets = [p for net in getattr(stage_obj, "nets", ()) if net is not None for p in net.parameters()]
    tokenizer = getattr(stage_obj, "tokenizer", None)
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)
    return dict(params=size(stage_obj.model.parameters()), grads=size(trained), adamw=2 * size(trained),
                discriminator=4 * size(d), loss_nets=size(nets),
                tokenizer=0 if tokenizer is None else size(tokenizer.parameters()))


def optimizer_temporaries(stage_obj):
    """The peak bytes of temporaries of the optimizer steps (train.optimizer_step: clip, then AdamW fused as on
    CUDA) on the gradients of the last training step, the largest over the stage's optimizers."""
    peak = 0
    for name, opt in stage_obj.optimizers.items():
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            continue
        groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in opt.param_groups]
        fused = torch.optim.AdamW(groups, fused=True)
        fused.step()                                 # its state made outside the count: it is the resident AdamW
        with PeakTemporaries() as temporaries:
            train.optimizer_step(fused, params, stage_obj.args.grad_clip)
        peak = max(peak, temporaries.peak)
    return peak


def picture_bytes(stage_obj):
    """Bytes that sampling the generator's pictures holds beside the training state: train.sampling_copy's
    bfloat16 weights and KV cache for the pictures' sequences (guidance doubles them), counted on the meta
    device. A tokenizer's pictures (8 images, no gradients) stay under one micro-batch's activations: 0."""
    if not isinstance(stage_obj, train.GeneratorStage):
        return 0
    cfg = stage_obj.model.config
    with torch.device("meta"):
        sampler = train.sampling_copy(alitok.Generator(cfg), torch.bfloat16)
    sequences = min(train.PICTURE_CLASSES, cfg.num_classes) * train.PICTURES_PER_CLASS * (1 + (cfg.cfg_scale != 1))
    sampler.setup_cache(sequences)                                  # in the weights' dtype: bfloat16
    caches = [t for block in sampler.blocks for t in (block.attn.cache.k, block.attn.cache.v)]
    return sum(t.numel() * t.element_size() for t in [*sampler.parameters(), *caches])   # the rotary table is shared


def largest_micro_batch(per_sample, fixed, memory, margin):
    """The most samples whose activations (per_sample bytes each) fit beside `fixed` bytes in `memory` bytes
    with a fraction `margin` of it kept free; 0 when not even one fits."""
    return max(0, (int(memory * (1 - margin)) - int(fixed)) // max(1, int(per_sample)))


def node_micro_batch(fits, share):
    """The --micro-batch for a process that must do `share` samples per step and fits `fits` at once: the
    largest power of two that divides share and is at most fits (0: none)."""
    size = 1 << max(0, min(fits, share).bit_length() - 1) if fits >= 1 else 0
    while size and share % size:
        size //= 2
    return size


def node_advice(fits, global_batch, gpus=NODE):
    """'--micro-batch M (G = gpus x M x accumulation)' for a global batch G on `gpus` GPUs, or why none works."""
    share = global_batch // gpus
    size = node_micro_batch(fits, share)
    return f"--micro-batch {size} ({global_batch} = {gpus} x {size} x {share // size})" if size else "does not fit"


def measure(stage, preset, margin=0.1, batches=BATCHES):
    """The plan's rows of one stage and preset: one per loss phase (see the module docstring)."""
    stage_obj, source = build_stage(stage, preset)
    resident, rows = resident_bytes(stage_obj), []
    global_batch = train.RECIPES[stage][preset]["batch_size"]
    for phase, step in phases(stage_obj).items():
        small, large = saved_bytes(stage_obj, step, batches)
        per_sample = (large - small) / (batches[1] - batches[0])
        row = dict(stage=stage, preset=preset, phase=phase, step=step, activations_per_sample=per_sample,
                   activations_fixed=small - per_sample * batches[0], **resident, loss_net_weights=source)
        row["optimizer_temporaries"], row["pictures"] = optimizer_temporaries(stage_obj), picture_bytes(stage_obj)
        held = sum(resident.values())
        row["fixed"] = held + row["activations_fixed"]
        apart = held + max(row["optimizer_temporaries"], row["pictures"])     # when no activations are held
        row["fits"] = {gpu: largest_micro_batch(per_sample, row["fixed"], memory, margin)
                       if apart <= memory * (1 - margin) else 0 for gpu, memory in GPUS.items()}
        row["node_80GB"] = node_advice(row["fits"]["80 GB"], global_batch)
        rows.append(row)
    return rows


def table(rows):
    """The plan as a markdown table: bytes in GB (10^9), activations in MB (10^6)."""
    gb, mb = (lambda x: f"{x / 1e9:.2f}"), (lambda x: f"{x / 1e6:.1f}")
    head = ["stage", "preset", "phase (step)", "activations MB / sample", "activations MB fixed", "params GB",
            "grads GB", "AdamW GB", "discriminator GB", "loss nets GB", "tokenizer GB", "fixed GB",
            "optimizer step temporaries GB", "pictures GB", "max micro-batch 80 GB", "141 GB",
            f"{NODE} x 80 GB node"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [STAGE_NAMES[r["stage"]], r["preset"], f"{r['phase']} ({r['step']})", mb(r["activations_per_sample"]),
                 mb(r["activations_fixed"]), *(gb(r[k]) for k in ("params", "grads", "adamw", "discriminator",
                                                                  "loss_nets", "tokenizer", "fixed",
                                                                  "optimizer_temporaries", "pictures")),
                 *(str(n) for n in r["fits"].values()), f"`{r['node_80GB']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    """Measure, print the markdown table and notes, write --json."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                   help="1, 2 (the tokenizer stages), ar (the generator) (default: all)")
    p.add_argument("--presets", nargs="+", default=["alitok", "B", "L", "XL"],
                   choices=sorted({p for names in PRESETS.values() for p in names}),
                   help="alitok (tokenizer stages), B, L, XL (generator), tiny (either) (default: the paper's)")
    p.add_argument("--margin", type=float, default=0.1, help="fraction of GPU memory kept free (default 0.1)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace a --json file that holds something else than "
                   "this plan's rows (another program's file, other stages, presets or margin)")
    args = p.parse_args(argv)
    plumbing.check_flags(args, FLAG_RULES)
    os.environ[weights.OFFLINE_ENV] = "1"          # the loss networks' files are used if cached, never fetched
    todo = [(s, preset) for s in args.stages for preset in args.presets if preset in PRESETS[s]]
    if not todo:
        raise ValueError(f"--presets {' '.join(args.presets)} has none of stages {' '.join(args.stages)}: "
                         f"tokenizer stages take alitok or tiny, the generator B, L, XL or tiny")
    job = {"program": "tools/memory_plan.py", "stages": args.stages, "presets": args.presets, "margin": args.margin}
    if args.json:                   # refused before the minutes of measuring, not after
        plumbing.claim(args.json, job, "--json", args.overwrite)
    began, rows = time.time(), []
    for stage, preset in todo:
        print(f"measuring {STAGE_NAMES[stage]} {preset} ...", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        rows += measure(stage, preset, args.margin)
    print(table(rows))
    nets = sorted({f"{STAGE_NAMES[r['stage']]} {r['preset']}: {r['loss_net_weights']}" for r in rows
                   if r["stage"] != "ar"})
    print(f"\nMeasured on the CPU (torch {torch.__version__}, bf16 autocast) at micro-batches {BATCHES[0]} and "
          f"{BATCHES[1]} in {time.time() - began:.0f} s; {args.margin:.0%} of each GPU kept free; the "
          f"node's --micro-batch divides the recipe's global batch / {NODE}.\nLoss networks: "
          + ("; ".join(nets) or "-") + ".\nHeavy kernels as zeros of their shape, the generator's attention "
          "dropout off; an estimate: see --help for what is and is not measured.")
    if args.json:
        plumbing.save_json(args.json, dict(margin=args.margin, batches=BATCHES, gpus=GPUS, torch=torch.__version__,
                                           seconds=time.time() - began, rows=rows), job=job)
    return 0


if __name__ == "__main__":
    sys.exit(plumbing.cli(main))
