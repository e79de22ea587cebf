"""Held-out evaluation during training (nanoGPT's estimate_loss): images and codes that training never sees,
every --eval-every steps. Tokenizers: reconstruction PSNR, code usage and perplexity, rFID where the FID
Inception file is at hand. Generators: next-token loss and accuracy over all, prefix and image tokens.
"""
import os

import torch
import torch.nn.functional as F

import data
import fid
import inception
import plumbing


def codebook_metrics(counts):
    """Fraction of codes used and perplexity exp(H) of a histogram of code counts."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).float().mean()), float(entropy.exp())


@torch.no_grad()
def tokenizer_heldout(model, images, autocast, inception=None, batch_size=64):
    """Held-out reconstruction of uint8 images [N, 3, S, S]: PSNR in dB (mean over images, the reconstruction
    rounded to uint8 as a saved picture), usage (0..1) and perplexity of the held-out codes; with `inception`
    ({"net": FID Inception}, where the originals' statistics are kept) also rFID of the reconstructions. The
    caller puts the model in eval mode (a train-mode forward would update the codebook)."""
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
    with plumbing.exact_float32():                          # the codes pre-tokenization makes
        codes = torch.cat([tok.encode(x.to(device).float() / 255).cpu() for x in images.split(batch_size)])
    return codes, labels


@torch.no_grad()
def generator_heldout(model, codes, labels, autocast, batch_size=64):
    """Held-out next-token cross-entropy (nats per token) and accuracy (0..1) by teacher forcing on codes
    [N, T] with their classes: over all tokens, the prefix tokens and the image tokens. The caller puts the model
    in eval mode (no dropout)."""
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


def rfid_network(args, device, log):
    """The FID Inception for held-out rFID: --inception, else the cached standard file; None (said once) if
    neither is there. Only rank 0 evaluates."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None
    net, why = inception.available_inception(args.inception, device)
    if net is None:
        log.info(f"held-out rFID off: {why}")
        return None
    return {"net": net}


def postfix(held):
    """The progress line's held-out entry: PSNR for a tokenizer, next-token loss for the generator."""
    key = next((k for k in ("heldout_psnr", "heldout_loss") if k in held), None)
    return {} if key is None else {key.replace("heldout_", "ho_"): f"{held[key]:.4g}"}
