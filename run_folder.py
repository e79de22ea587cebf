"""A run folder (train.py --out): what a run leaves there, refusing a folder that holds another run or a file
that another flag names, starting over, and the training state saved for --resume. A state records what the run
was made from (stage, preset, model config, the data's and the tokenizer's fingerprints) and a resume that
differs in any of them is refused before a tensor is loaded.
"""
import glob
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

import plumbing
from checkpoints import FORMAT, load_strict, read_checkpoint

# ----------------------------------------------------------------------------------------------------
# Training states (train.py --resume): RNG states, what a file holds, refusing the wrong one
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


def describe(ck, with_step=False):
    """What a loaded checkpoint holds, in words for messages ("a stage-1 run of preset tiny", "... at step 30")."""
    if isinstance(ck, dict) and "stage" in ck and isinstance(ck.get("args"), dict):
        at = f" at step {ck.get('step')}" if with_step else ""
        return f"a stage-{ck['stage']} run of preset {ck['args'].get('preset')}{at}"
    if isinstance(ck, dict) and "config" in ck and "model" in ck:
        return "a finished model file (tokenizer.pt / generator.pt), not a training state"
    return "weights without this project's training state (a released file?)"


def read_resumable(path, args, log):
    """The training state of `path` for --resume (None if the folder holds no run yet), refused before any setup
    when it is not a train.py training state, holds another stage's or preset's run, or is missing beside a
    finished model file (a finished run has nothing to continue)."""
    if not os.path.exists(path):
        final = final_file(args)
        if final and os.path.exists(final):
            raise ValueError(f"{args.out} holds a finished {os.path.basename(final)} but no ckpt.pt to continue "
                             f"from: use it as it is, or choose another --out, or train it again with --restart "
                             f"(replaces {', '.join(os.path.basename(p) for p in run_files(args))})")
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


# What a run records of its inputs (stage.saved) and the flag that chose each: a resume must find the same
MADE_FROM = {"data_fingerprint": "--data", "tokenizer_fingerprint": "--tokenizer"}


def check_same_run(stage, ck, path):
    """Refuse to resume a run made with other settings (model config, GAN on or off) or from other inputs (the
    data's or the tokenizer's fingerprint) before loading tensors."""
    config = asdict(stage.model.config)
    differ = [f"{k}={ck['config'].get(k)!r} (now {v!r})" for k, v in config.items() if ck["config"].get(k) != v]
    for what, mine in (("modules", stage.modules), ("optimizers", stage.optimizers)):
        if set(ck[what]) != set(mine):
            differ.append(f"{what} {sorted(ck[what])} (now {sorted(mine)})")
    if differ:
        raise ValueError(f"{os.path.dirname(path)} holds {describe(ck)} made with other settings: "
                         f"{', '.join(differ)}. Resume with the flags it was made with, or choose another --out")
    for key, flag in MADE_FROM.items():
        theirs, mine = ck.get(key), stage.saved.get(key)
        if theirs is not None and mine is not None and theirs != mine:
            was = ck["args"].get(flag[2:])
            raise ValueError(f"{os.path.dirname(path)} holds {describe(ck)} trained on {flag} {was} (fingerprint "
                             f"{theirs}), but {flag} {getattr(stage.args, flag[2:])} has fingerprint {mine}: resume "
                             f"with {flag} {was}, or train on the new one in another --out (or --restart)")


def save(stage, args, step, path, rngs, kept):
    """The whole training state at `step` (AdamW moments and every rank's RNG state `rngs` included), written
    atomically; rank 0 calls it. A failed write (a full disk) says that the last good checkpoint (step `kept`)
    is intact."""
    state = {"format": FORMAT, "stage": args.stage, "step": step, "config": asdict(stage.model.config),
             "model": stage.model.state_dict(), "modules": {k: m.state_dict() for k, m in stage.modules.items()},
             "optimizers": {k: o.state_dict() for k, o in stage.optimizers.items()},
             "rng": rngs, "args": vars(args), **stage.saved}
    try:
        plumbing.save_checkpoint(state, path)
    except OSError as error:
        raise OSError(f"{error}; the last good checkpoint is {path} at step {kept}" if kept else
                      f"{error}; no checkpoint was written before") from None


def resume(stage, ck, path, rank, world, log):
    """Load the training state `ck` (read from `path`) into the stage; the step to continue from."""
    check_same_run(stage, ck, path)
    load_strict(stage.model, ck["model"], source=path)
    for name, module in stage.modules.items():
        load_strict(module, ck["modules"][name], source=path)
    for name, opt in stage.optimizers.items():
        opt.load_state_dict(ck["optimizers"][name])
    set_rng_state(ck["rng"][rank] if len(ck["rng"]) == world else ck["rng"][0])
    log.info(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


# ----------------------------------------------------------------------------------------------------
# A run folder: refused when it holds a run, unless continued or started over; never a file another flag names
# ----------------------------------------------------------------------------------------------------

def final_file(args):
    """The file a finished run leaves (stage 2: tokenizer.pt, generator: generator.pt; stage 1: none)."""
    name = {"1": None, "2": "tokenizer.pt", "ar": "generator.pt"}[args.stage]
    return name and os.path.join(args.out, name)


def run_files(args):
    """What a run leaves in its folder (that exist): checkpoint, final file, logs, pictures, default codes."""
    names = ["ckpt.pt", final_file(args), "metrics.jsonl", "metrics.png", "latest.png"] + (
        ["codes.npz"] if args.stage == "ar" and args.codes is None else [])
    found = [os.path.join(args.out, n) for n in names if n and os.path.exists(os.path.join(args.out, n))]
    return found + sorted(glob.glob(os.path.join(args.out, "pictures_*.png")))


def check_inputs_outside(args):
    """Refuse a run whose --init, --tokenizer or --codes is a file the run itself writes in --out (its ckpt.pt,
    final file or default codes): training would replace its own input, and --restart would delete it."""
    written = [os.path.join(args.out, "ckpt.pt"), final_file(args)]
    written += [os.path.join(args.out, "codes.npz")] if args.stage == "ar" and args.codes is None else []
    for flag in ("--init", "--tokenizer", "--codes"):
        named = getattr(args, flag[2:], None)
        for path in (p for p in written if p and named):
            if os.path.abspath(named) == os.path.abspath(path):
                raise ValueError(f"{flag} {named} lies in --out {args.out}, where this run writes its "
                                 f"{os.path.basename(path)}: choose another --out, so that {flag} stays as it is")


def refuse_or_restart(args, rank, log):
    """A folder that holds a run is never overwritten silently: without --restart, ValueError naming its run and
    the ways out; with it, the run's files are removed (and listed) first."""
    used = [p for p in run_files(args) if os.path.basename(p) in ("ckpt.pt", "tokenizer.pt", "generator.pt")]
    if not used:
        return
    ckpt = os.path.join(args.out, "ckpt.pt")
    replaced = ", ".join(os.path.basename(p) for p in run_files(args))
    what = (describe(read_checkpoint(ckpt, "the run folder's checkpoint"), with_step=True)
            if os.path.exists(ckpt) else f"a finished {os.path.basename(used[0])}")
    if not args.restart:
        resume = "continue it with --resume, or " if os.path.exists(ckpt) else ""     # nothing to continue
        raise ValueError(f"{args.out} holds {what}: {resume}start over with --restart (replaces {replaced}), or "
                         f"choose another --out")
    plumbing.barrier()                                          # every rank has looked before rank 0 removes
    if rank == 0:
        for path in run_files(args):
            os.remove(path)
        log.info(f"--restart: removed {what} from {args.out}")
    plumbing.barrier()

