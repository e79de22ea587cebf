"""Weight files: the released AliTok files and this project's checkpoints, loaded strictly (strict=True, with a
message naming what does not fit), and the training states train.py writes for --resume: checked before any
setup, never silently overwritten, written so that a failed write names the last good state.
"""
import glob
import hashlib
import math
import os
from dataclasses import asdict, fields, replace

import torch
import torch.distributed as dist

import plumbing
from alitok import (GENERATOR_PRESETS, TOKENIZER_PRESETS, ARConfig, Generator, Tokenizer, TokenizerConfig)


# ----------------------------------------------------------------------------------------------------
# Released weights and this project's checkpoints, strictly
# ----------------------------------------------------------------------------------------------------



def read_checkpoint(path, what="checkpoint"):
    """torch.load a weight file onto the CPU (weights_only); FileNotFoundError or ValueError saying what
    `what` was expected where the file is missing, truncated or not a PyTorch file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip reader, unpickler and EOF errors all mean the same to a user
        raise ValueError(f"{what} {os.fspath(path)!r} is not a readable PyTorch file (truncated or corrupt? "
                         f"{type(error).__name__}: {str(error).splitlines()[0][:200]})") from error


def _state_dict_of(obj):
    """A checkpoint path or dict -> (state dict, saved config dict or None)."""
    if not isinstance(obj, dict):
        obj = read_checkpoint(obj)
    if "config" in obj and "model" in obj:                  # this project's checkpoint
        return obj["model"], obj["config"]
    for key in ("state_dict", "model", "module", "ema"):    # common wrappers of released files
        if key in obj and isinstance(obj[key], dict):
            return obj[key], None
    return obj, None


def load_strict(model, state, fits=None, source=None, assign=False):
    """load_state_dict(strict=True) with a ValueError naming missing, unexpected and mis-shaped tensors (and
    the file `source` they came from); assign=True fills a model built on the meta device."""
    if not isinstance(state, dict):
        raise ValueError(f"{source or 'checkpoint'} holds a {type(state).__name__}, not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        lines = [f"{source or 'checkpoint'} does not fit {type(model).__name__}:"]
        for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)):
            if items:
                lines.append(f"  {len(items)} {what}: " + ", ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
        if fits is not None:
            lines.append(f"  the config that would fit the file: {fits}")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state, strict=True, assign=assign)
    return model


def tokenizer_widths(state):
    """(encoder width, decoder width) of a tokenizer state dict."""
    return state["latent_tokens"].shape[1], state["decoder.decoder_embed.weight"].shape[0]


def preset_heads(enc_width, dec_width):
    """(enc_heads, dec_heads) of the tokenizer preset with these widths, or None: no tensor's shape holds them."""
    return next(((p.enc_heads, p.dec_heads) for p in TOKENIZER_PRESETS.values()
                 if (p.enc_width, p.dec_width) == (enc_width, dec_width)), None)


def infer_tokenizer_config(state):
    """The TokenizerConfig of a bare tokenizer state dict: every size from its tensors' shapes, the stage settings
    from its layout (the start token, aux head and `embed_prob` of stage 1's causal decoder, or stage 2's buffer
    tokens), the head counts from the preset of the same widths; ValueError naming the config to pass where no
    preset has those widths (head counts change no shape)."""
    n_layers = lambda p: len({k.split(".")[2] for k in state if k.startswith(p + ".transformer.")})
    enc_w, dec_w = tokenizer_widths(state)
    heads = preset_heads(enc_w, dec_w)
    if heads is None:
        raise ValueError(f"a bare tokenizer state dict of widths {enc_w} (encoder) and {dec_w} (decoder), which no "
                         f"preset has: its head counts cannot be read from shapes; pass its config "
                         f"(load_tokenizer(path, config=TokenizerConfig(...))) or save it with "
                         f"checkpoints.checkpoint(model), which keeps the config")
    patch = state["encoder.patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["encoder.positional_embedding"].shape[0])
    n_tokens = state["latent_tokens"].shape[0]
    stage1 = "decoder.ffn_aux.0.weight" in state
    return TokenizerConfig(
        image_size=grid * patch, patch_size=patch, enc_width=enc_w, enc_layers=n_layers("encoder"),
        enc_heads=heads[0], dec_width=dec_w, dec_layers=n_layers("decoder"), dec_heads=heads[1],
        codebook_size=state["quantize.embedding.weight"].shape[0],
        codebook_dim=state["quantize.embedding.weight"].shape[1], n_prefix=n_tokens - grid * grid, causal=stage1,
        start_token=stage1, n_buffer=state["decoder.class_embedding"].shape[0] - stage1, aux_head=stage1,
        cluster_codebook="quantize.embed_prob" in state)


def infer_generator_config(state, **overrides):
    """The ARConfig implied by a generator state dict (n_prefix, grid: the released 17, 16 unless given)."""
    width = state["embeddings.weight"].shape[1]
    head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
    K = state["output.weight"].shape[0]
    kw = dict(width=width, layers=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
              heads=width // head_dim, codebook_size=K, num_classes=state["embeddings.weight"].shape[0] - K - 2)
    preset = next((p for p in GENERATOR_PRESETS.values() if all(getattr(p, k) == v for k, v in kw.items())), None)
    return replace(preset, **overrides) if preset else ARConfig(**kw, **overrides)


def _config_from(cls, saved):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in names})


def load_tokenizer(path_or_state_dict, map_location="cpu", config=None):
    """A Tokenizer (eval mode) from the released AliTok.pth, a stage-1/2 training state or our checkpoint; config:
    the TokenizerConfig of a bare state dict whose widths no preset has (else inferred from it)."""
    state, saved = _state_dict_of(path_or_state_dict)
    if saved is None and "tokenizer" in state and isinstance(state["tokenizer"], dict):
        state, saved = state["tokenizer"], state.get("tokenizer_config")
    known = "latent_tokens" in state and preset_heads(*tokenizer_widths(state)) is not None
    inferred = infer_tokenizer_config(state) if known else None     # the sizes the file has, for messages
    cfg = config or (_config_from(TokenizerConfig, saved) if saved else None)
    if cfg is None and "latent_tokens" not in state:
        raise ValueError("not a tokenizer checkpoint: no `latent_tokens` tensor and no saved config")
    model = load_strict(Tokenizer(cfg or infer_tokenizer_config(state)), state, fits=inferred)
    return model.to(map_location).eval()


def _generator_state(path_or_state_dict, overrides):
    """(state dict, config, config inferred from the shapes) of a generator file (released or ours)."""
    state, saved = _state_dict_of(path_or_state_dict)
    if saved is None and "generator" in state and isinstance(state["generator"], dict):
        state, saved = state["generator"], state.get("generator_config")
    if "embeddings.weight" not in state:
        raise ValueError("not a generator checkpoint: no `embeddings.weight` tensor and no saved config")
    inferred = infer_generator_config(state, **overrides)
    return state, replace(_config_from(ARConfig, saved), **overrides) if saved else inferred, inferred


def load_generator(path_or_state_dict, map_location="cpu", **overrides):
    """A Generator (eval mode) from the released alitok_{b,l,xl}.bin or this project's checkpoint."""
    state, cfg, inferred = _generator_state(path_or_state_dict, overrides)
    model = load_strict(Generator(cfg), state, fits=inferred)
    return model.to(map_location).eval()


def class_names(ckpt):
    """The class names a generator file carries (train.py writes its data's), or None: the released files name
    none (their classes are ImageNet-1k's indices 0..999)."""
    names = ckpt.get("class_names") if isinstance(ckpt, dict) else None
    return [str(n) for n in names] if names is not None else None


def generator_for_classes(ckpt, names, **overrides):
    """Fine-tuning start: (Generator, kept, new) from a generator file (released or ours) for data of classes
    `names`. Every tensor comes strictly from the file but the class rows of `embeddings`, resized to len(names):
    the code rows, the unused id and the null class are kept; a class keeps its row when the file names it (a
    file that names none, a released one, keeps rows by index if it has as many classes), otherwise its row is
    new (the init's N(0, 0.02)). kept / new: the new class indices whose row was kept / is new."""
    state, old, _ = _generator_state(ckpt, overrides)
    model = Generator(replace(old, num_classes=len(names)))
    own = class_names(ckpt)
    if own is not None:                                    # our files: by name
        source_row = {c: own.index(name) for c, name in enumerate(names) if name in own}
    elif old.num_classes == len(names):                    # a released file: the same classes, in index order
        source_row = {c: c for c in range(len(names))}
    else:
        source_row = {}
    table, first = model.embeddings.weight.detach().clone(), old.codebook_size + 1    # rows 0..K: codes, unused
    table[:first] = state["embeddings.weight"][:first]
    table[-1] = state["embeddings.weight"][-1]                                         # the null class
    for c, row in source_row.items():
        table[first + c] = state["embeddings.weight"][first + row]
    load_strict(model, {**state, "embeddings.weight": table}, source="the --init generator")
    return model.eval(), sorted(source_row), [c for c in range(len(names)) if c not in source_row]


def checkpoint(model):
    """A self-contained checkpoint dict: the model's config and state, rebuilt by load_tokenizer/load_generator."""
    return {"config": asdict(model.config), "model": model.state_dict()}


def codebook_fingerprint(tokenizer):
    """16 hex digits of SHA-256 over a tokenizer's codebook (its shape, then its weights as float32 bytes): equal
    for tokenizers whose codes mean the same vectors, different (up to 2^-64) for any other codebook."""
    codebook = tokenizer.quantize.embedding.weight.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(codebook.shape)).encode())
    digest.update(codebook.numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Training states (train.py --resume): RNG states, what a file holds, refusing the wrong one
# ----------------------------------------------------------------------------------------------------

def rng_state():
    """The torch RNG states (dropout, class dropout); data order and augmentations need none."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    """Restore the torch RNG states that rng_state() returned (the CUDA ones where there is CUDA)."""
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


def describe(ck, with_step=False):
    """What a loaded checkpoint holds, in words for messages ("a stage-1 run of preset tiny", "... at step 30")."""
    if isinstance(ck, dict) and "stage" in ck and isinstance(ck.get("args"), dict):
        at = f" at step {ck.get('step')}" if with_step else ""
        return f"a stage-{ck['stage']} run of preset {ck['args'].get('preset')}{at}"
    if isinstance(ck, dict) and "config" in ck and "model" in ck:
        return "a finished model file (tokenizer.pt / generator.pt), not a training state"
    return "weights without this project's training state (a released file?)"


def read_resumable(path, args, log):
    """The training state of `path` for --resume (None if there is none yet), refused before any setup when
    it is not a train.py training state or holds another stage's or preset's run."""
    if not os.path.exists(path):
        log.info(f"--resume: no {path} yet, starting from step 0")
        return None
    ck = read_checkpoint(path, "training checkpoint (--resume)")
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


def check_same_run(stage, ck, path):
    """Refuse to resume a run made with other settings (model config, GAN on or off) before loading tensors."""
    config = asdict(stage.model.config)
    differ = [f"{k}={ck['config'].get(k)!r} (now {v!r})" for k, v in config.items() if ck["config"].get(k) != v]
    for what, mine in (("modules", stage.modules), ("optimizers", stage.optimizers)):
        if set(ck[what]) != set(mine):
            differ.append(f"{what} {sorted(ck[what])} (now {sorted(mine)})")
    if differ:
        raise ValueError(f"{os.path.dirname(path)} holds {describe(ck)} made with other settings: "
                         f"{', '.join(differ)}. Resume with the flags it was made with, or choose another --out")


# ----------------------------------------------------------------------------------------------------
# A run folder: refused when it holds a run, unless continued or started over; states saved and resumed
# ----------------------------------------------------------------------------------------------------

def run_files(args):
    """What a run leaves in its folder (that exist): checkpoint, final file, logs, pictures, default codes."""
    names = ["ckpt.pt", {"1": None, "2": "tokenizer.pt", "ar": "generator.pt"}[args.stage], "metrics.jsonl",
             "metrics.png", "latest.png"] + (["codes.npz"] if args.stage == "ar" and args.codes is None else [])
    found = [os.path.join(args.out, n) for n in names if n and os.path.exists(os.path.join(args.out, n))]
    return found + sorted(glob.glob(os.path.join(args.out, "pictures_*.png")))


def refuse_or_restart(args, rank, log):
    """A folder that holds a run is never overwritten silently: without --restart, ValueError naming its run and
    both ways out; with it, the run's files are removed (and listed) first."""
    used = [p for p in run_files(args) if os.path.basename(p) in ("ckpt.pt", "tokenizer.pt", "generator.pt")]
    if not used:
        return
    ckpt = os.path.join(args.out, "ckpt.pt")
    what = (describe(read_checkpoint(ckpt, "the run folder's checkpoint"), with_step=True)
            if os.path.exists(ckpt) else f"a finished {os.path.basename(used[0])}")
    if not args.restart:
        raise ValueError(f"{args.out} holds {what}: continue it with --resume, or start over with --restart "
                         f"(replaces {', '.join(os.path.basename(p) for p in run_files(args))}), or choose "
                         f"another --out")
    plumbing.barrier()                                          # every rank has looked before rank 0 removes
    if rank == 0:
        for path in run_files(args):
            os.remove(path)
        log.info(f"--restart: removed {what} from {args.out}")
    plumbing.barrier()


def save(stage, args, step, path, rngs, kept):
    """The whole training state at `step` (AdamW moments and every rank's RNG state `rngs` included), written
    atomically; rank 0 calls it. A failed write (a full disk) says that the last good checkpoint (step `kept`)
    is intact."""
    state = {"stage": args.stage, "step": step, "config": asdict(stage.model.config),
             "model": stage.model.state_dict(), "modules": {k: m.state_dict() for k, m in stage.modules.items()},
             "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
             "rng": rngs, "args": vars(args), **stage.saved}
    try:
        plumbing.save_checkpoint(state, path)
    except OSError as error:
        raise OSError(f"{error}; the last good checkpoint is {path} at step {kept}" if kept else
                      f"{error}; no checkpoint was written before") from None


def resume(stage, ck, path, rank, world, log):
    """Load the training state `ck` (read from `path`) into the stage, refused (check_same_run) when made with
    other settings: model, modules, optimizers and this rank's RNG state; the step to continue from."""
    check_same_run(stage, ck, path)
    load_strict(stage.model, ck["model"], source=path)
    for name, module in stage.modules.items():
        load_strict(module, ck["modules"][name], source=path)
    for name, opt in stage.optimizers.items():
        opt.load_state_dict(ck["optimizers"][name])
    set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
    log.info(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def load_frozen_tokenizer(path, device):
    """The tokenizer whose codes the generator learns, frozen (eval mode)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"stage ar needs a tokenizer checkpoint: {path} not found. Train one (`python "
                                f"train.py --stage 1` then `--stage 2`) or pass --tokenizer AliTok.pth (the "
                                f"released tokenizer).")
    saved = read_checkpoint(path, "tokenizer checkpoint (--tokenizer)")
    try:
        tok = load_tokenizer(saved)
    except ValueError as error:
        raise ValueError(f"--tokenizer {path} is not a tokenizer checkpoint ({str(error)[:300]}); pass the "
                         f"stage-2 tokenizer.pt of `python train.py --stage 2` or the released AliTok.pth") from None
    return tok.to(device).requires_grad_(False)
