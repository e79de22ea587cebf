"""Weight files: the released AliTok files and this project's checkpoints, read with one line naming the file
when it is damaged, and loaded strictly (strict=True, with a message naming what does not fit). The training
states train.py writes for --resume and the rules of a run folder are in run_folder.py.
"""
import hashlib
import math
import os
from dataclasses import asdict, fields, replace

import torch

from alitok import (GENERATOR_PRESETS, TOKENIZER_PRESETS, ARConfig, Generator, Tokenizer, TokenizerConfig)


# ----------------------------------------------------------------------------------------------------
# Released weights and this project's checkpoints, strictly
# ----------------------------------------------------------------------------------------------------



FORMAT = 1  # the layout of this project's checkpoints and training states ("format" in each file)


def read_checkpoint(path, what="checkpoint"):
    """torch.load a weight file onto the CPU (weights_only); FileNotFoundError or ValueError saying what
    `what` was expected where the file is missing, empty, truncated or not a PyTorch file, or is one of this
    project's checkpoints in a format this code does not read."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what} {os.fspath(path)!r} is empty (0 bytes): write it again, or pass another file")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip reader, unpickler and EOF errors all mean the same to a user
        detail = (str(error).splitlines() or [""])[0][:200]
        raise ValueError(f"{what} {os.fspath(path)!r} is not a readable PyTorch file (truncated or corrupt? "
                         f"{type(error).__name__}{': ' + detail if detail else ''}): write it again, or pass "
                         f"another file") from error
    check_format(ck, path)
    return ck


def check_format(ck, source):
    """Raise ValueError when `ck` is one of this project's checkpoints (a "config" beside "model") of another
    format than FORMAT; files without "format" are read as format 1."""
    if isinstance(ck, dict) and "config" in ck and ck.get("format", 1) != FORMAT:
        raise ValueError(f"{source} is a checkpoint of format {ck['format']!r}; this code reads format {FORMAT}: "
                         f"use the version of this code that wrote it")


def _state_dict_of(obj, source):
    """A checkpoint path or dict -> (state dict, saved config dict or None)."""
    if not isinstance(obj, dict):
        obj = read_checkpoint(obj)
    check_format(obj, source)
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


def _config_from(cls, saved, source):
    """cls(**saved), refusing keys cls does not have (a file of other code: its model would not be the same)."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{source}: its config has keys this code does not know ({', '.join(unknown)}): it was "
                         f"written by other code; use the version of this code that wrote it")
    return cls(**saved)


def _name(path_or_state_dict):
    return repr(os.fspath(path_or_state_dict)) if isinstance(path_or_state_dict, (str, os.PathLike)) else "checkpoint"


def load_tokenizer(path_or_state_dict, map_location="cpu", config=None, source=None):
    """A Tokenizer (eval mode) from the released AliTok.pth, a stage-1/2 training state or our checkpoint; config:
    the TokenizerConfig of a bare state dict whose widths no preset has (else inferred from it); source: the
    file's name in messages."""
    source = source or _name(path_or_state_dict)
    state, saved = _state_dict_of(path_or_state_dict, source)
    if saved is None and "tokenizer" in state and isinstance(state["tokenizer"], dict):
        state, saved = state["tokenizer"], state.get("tokenizer_config")
    if isinstance(state, dict) and "embeddings.weight" in state and "latent_tokens" not in state:
        raise ValueError(f"{source} is a generator checkpoint, not a tokenizer: pass a tokenizer (the stage-2 "
                         f"tokenizer.pt of `python train.py --stage 2`, or the released AliTok.pth)")
    known = "latent_tokens" in state and preset_heads(*tokenizer_widths(state)) is not None
    inferred = infer_tokenizer_config(state) if known else None     # the sizes the file has, for messages
    cfg = config or (_config_from(TokenizerConfig, saved, source) if saved else None)
    if cfg is None and "latent_tokens" not in state:
        raise ValueError(f"{source} is not a tokenizer checkpoint: no `latent_tokens` tensor and no saved config")
    model = load_strict(Tokenizer(cfg or infer_tokenizer_config(state)), state, fits=inferred, source=source)
    return model.to(map_location).eval()


def _generator_state(path_or_state_dict, overrides, source=None):
    """(state dict, config, config inferred from the shapes) of a generator file (released or ours)."""
    source = source or _name(path_or_state_dict)
    state, saved = _state_dict_of(path_or_state_dict, source)
    if saved is None and "generator" in state and isinstance(state["generator"], dict):
        state, saved = state["generator"], state.get("generator_config")
    if "embeddings.weight" not in state:
        kind = "a tokenizer checkpoint" if "latent_tokens" in state else "not a generator checkpoint"
        raise ValueError(f"{source} is {kind}: no `embeddings.weight` tensor and no saved config; pass a generator "
                         f"(the generator.pt of `python train.py --stage ar`, or a released alitok_b.bin)")
    inferred = infer_generator_config(state, **overrides)
    return state, replace(_config_from(ARConfig, saved, source), **overrides) if saved else inferred, inferred


def load_generator(path_or_state_dict, map_location="cpu", source=None, **overrides):
    """A Generator (eval mode) from the released alitok_{b,l,xl}.bin or this project's checkpoint; source: the
    file's name in messages."""
    source = source or _name(path_or_state_dict)
    state, cfg, inferred = _generator_state(path_or_state_dict, overrides, source)
    model = load_strict(Generator(cfg), state, fits=inferred, source=source)
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
    state, old, _ = _generator_state(ckpt, overrides, "the --init generator")
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
    return {"format": FORMAT, "config": asdict(model.config), "model": model.state_dict()}


def codebook_fingerprint(tokenizer):
    """16 hex digits of SHA-256 over a tokenizer's codebook (its shape, then its weights as float32 bytes): equal
    for tokenizers whose codes mean the same vectors, different (up to 2^-64) for any other codebook."""
    codebook = tokenizer.quantize.embedding.weight.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(codebook.shape)).encode())
    digest.update(codebook.numpy().tobytes())
    return digest.hexdigest()[:16]


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
