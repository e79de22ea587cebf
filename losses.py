"""The tokenizer's losses (spec: "Losses of the released recipe"), as the original's criterion computes them.

- ConvNeXt-S perceptual loss: MSE between ImageNet logits of reconstruction and target.
- LPIPS (VGG16 features + v0.1 linear heads), used early in each stage.
- PatchGAN-style discriminator (MaskBit style) with hinge losses, switched on late in each stage.
- The criterion: reconstruction (+ aux), perceptual, quantizer and adversarial terms, in float32.

The frozen networks load strictly from their standard files (torchvision and lpips names), which a run fetches
on first use (weights.py) unless a path is given. Images are NCHW float in [0, 1].
"""
import math
import os
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import alitok
import checkpoints
import plumbing
import weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips ScalingLayer, for inputs in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)

CONVNEXT_SOURCE = ("torchvision's ImageNet-1k ConvNeXt-S weights, convnext_small-0c510722.pth "
                   "(https://download.pytorch.org/models/convnext_small-0c510722.pth)")
VGG_SOURCE = ("torchvision's ImageNet-1k VGG16 weights, vgg16-397923af.pth "
              "(https://download.pytorch.org/models/vgg16-397923af.pth)")
LPIPS_LIN_SOURCE = ("the LPIPS v0.1 VGG linear heads, vgg.pth, from richzhang/PerceptualSimilarity "
                    "(lpips/weights/v0.1/vgg.pth, also shipped in the `lpips` pip package)")


def _channels(x, values):
    """A per-channel constant shaped [1, C, 1, 1] on x's device and dtype."""
    return torch.tensor(values, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------
# ConvNeXt-S (torchvision layout) and the perceptual loss
# --------------------------------------------------------------------------------------------------

class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (torchvision's LayerNorm2d)."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """x + layer_scale * (7x7 depthwise conv -> LayerNorm -> Linear 4C -> GELU -> Linear C)."""

    def __init__(self, dim):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((dim, 1, 1), 1e-6))
        # Indices 1 and 4 are torchvision's Permute and GELU; the placeholders keep the weight names.
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.Identity(), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b = self.block
        h = b[0](x).permute(0, 2, 3, 1)  # B, H, W, C: LayerNorm and Linears act on channels last
        h = b[5](F.gelu(b[3](b[2](h)))).permute(0, 3, 1, 2)  # B, C, H, W
        return x + self.layer_scale * h  # stochastic depth is the identity in eval


class ConvNeXtSmall(nn.Module):
    """torchvision `convnext_small`: images normalised NCHW -> logits [B, num_classes]."""

    def __init__(self, widths=(96, 192, 384, 768), depths=(3, 3, 27, 3), num_classes=1000):
        super().__init__()
        # features: stem, stage 1, (downsample, stage) x 3 -- torchvision's flat numbering.
        layers = [nn.Sequential(nn.Conv2d(3, widths[0], 4, stride=4), LayerNorm2d(widths[0], eps=1e-6))]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            if i > 0:
                layers.append(nn.Sequential(LayerNorm2d(widths[i - 1], eps=1e-6),
                                            nn.Conv2d(widths[i - 1], width, 2, stride=2)))
            layers.append(nn.Sequential(*[ConvNeXtBlock(width) for _ in range(depth)]))
        self.features = nn.Sequential(*layers)
        # Index 1 is torchvision's Flatten; the placeholder keeps the weight names.
        self.classifier = nn.Sequential(LayerNorm2d(widths[-1], eps=1e-6), nn.Identity(),
                                        nn.Linear(widths[-1], num_classes))

    def forward(self, x):
        x = self.features(x).mean((2, 3), keepdim=True)  # B, C, 1, 1: global average pool
        return self.classifier[2](self.classifier[0](x).flatten(1))


def convnext_input(x, size=224):
    """Images in [0, 1], [B, 3, H, W] -> [B, 3, size, size]: antialiased bilinear resize, ImageNet norm."""
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - _channels(x, IMAGENET_MEAN)) / _channels(x, IMAGENET_STD)


def perceptual_loss(net, x, y):
    """MSE between ConvNeXt logits of x and y (images in [0, 1]); mean over batch and the 1000 logits. The
    forward in full float32 (no TF32)."""
    with plumbing.exact_float32():
        logits = net(convnext_input(torch.cat([x, y])))  # one pass for both: 2B, 1000
    return F.mse_loss(*logits.chunk(2))


# --------------------------------------------------------------------------------------------------
# LPIPS: VGG16 features (torchvision layout) + v0.1 linear heads
# --------------------------------------------------------------------------------------------------

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22, 29)  # features indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG16_TAP_CHANNELS = (64, 128, 256, 512, 512)


class VGG16(nn.Module):
    """torchvision `vgg16` (no batch norm); forward returns the five LPIPS feature taps."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CONFIG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        # Unused by LPIPS; kept only so that torchvision's file loads strictly.
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, 1000))

    def forward(self, x):
        taps = []
        for i, layer in enumerate(self.features[:VGG16_TAPS[-1] + 1]):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return taps


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG): images in [-1, 1], [B, 3, H, W] x2 -> distances [B]."""

    def __init__(self):
        super().__init__()
        self.net = VGG16()
        # lin{k}.model = (Dropout, 1x1 conv to 1 channel, no bias): lpips's NetLinLayer, for the weight names.
        for k, c in enumerate(VGG16_TAP_CHANNELS):
            self.add_module(f"lin{k}", nn.ModuleDict(
                {"model": nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))}))

    def heads(self):
        """The five linear heads as one module named as in the lpips file (lin{k}.model.1.weight); it shares
        them, so loading into it (assign=True included) fills this LPIPS."""
        heads = nn.Module()
        for k in range(len(VGG16_TAP_CHANNELS)):
            heads.add_module(f"lin{k}", getattr(self, f"lin{k}"))
        return heads

    def forward(self, x, y):
        xy = torch.cat([x, y])  # one pass for both images
        feats = self.net((xy - _channels(xy, LPIPS_SHIFT)) / _channels(xy, LPIPS_SCALE))  # lpips ScalingLayer
        dist = 0
        for k, f in enumerate(feats):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length per pixel, lpips's eps
            fx, fy = f.chunk(2)
            dist = dist + getattr(self, f"lin{k}")["model"]((fx - fy) ** 2).mean((1, 2, 3))  # B
        return dist


def lpips(net, x, y):
    """LPIPS distance between images x and y in [0, 1], [B, 3, H, W] (no resizing); mean over the batch."""
    return net(2 * x - 1, 2 * y - 1).mean()


# --------------------------------------------------------------------------------------------------
# Loading the frozen networks from user-named files (no downloads)
# --------------------------------------------------------------------------------------------------

def _read_weights(path, source, loss_name):
    """The state dict in `path`, or an error saying which file it is and what works without it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"weight file not found: '{path}'. It should be {source}. Download it on a machine with "
            f"network access and pass its path. Without it, train with the {loss_name} loss switched off; "
            f"everything else works.")
    return checkpoints.read_checkpoint(path, f"{loss_name} weight file ({source})")


def load_convnext(path):
    """ConvNeXt-S from torchvision's file `path` (convnext_small-0c510722.pth); eval mode, frozen."""
    state = _read_weights(path, CONVNEXT_SOURCE, "perceptual")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        net = ConvNeXtSmall()
    checkpoints.load_strict(net, state, source=os.fspath(path), assign=True)
    return net.eval().requires_grad_(False)


def load_lpips(vgg_path, lin_path):
    """LPIPS from torchvision's vgg16-397923af.pth and LPIPS v0.1 vgg.pth; eval mode, frozen."""
    with torch.device("meta"):
        net = LPIPS()
    lin = _read_weights(lin_path, LPIPS_LIN_SOURCE, "LPIPS")  # the small file first: fail fast
    checkpoints.load_strict(net.heads(), lin, source=os.fspath(lin_path), assign=True)
    vgg = _read_weights(vgg_path, VGG_SOURCE, "LPIPS")
    checkpoints.load_strict(net.net, vgg, source=os.fspath(vgg_path), assign=True)
    return net.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------
# PatchGAN-style discriminator (MaskBit style) and hinge losses
# --------------------------------------------------------------------------------------------------

def same_padding(size, kernel, stride):
    """TensorFlow "same" padding of one side: (before, after) for an input of `size` pixels."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class BlurDownsample(nn.Module):
    """Halve H and W of [B, C, H, W]: "same" padding, then a depthwise stride-2 conv with a fixed blur."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        # Blurring before subsampling avoids aliasing that the tokenizer could learn to exploit. A buffer, not a
        # parameter: the original saves it as `kernel` [1, 1, 4, 4] and never trains it.
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64)[None, None])  # sums to 1

    def forward(self, x):
        (top, bottom), (left, right) = same_padding(x.shape[-2], 4, 2), same_padding(x.shape[-1], 4, 2)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.kernel.to(x.dtype).expand(x.shape[1], 1, 4, 4), stride=2, groups=x.shape[1])


def _group_norm(c):
    """GroupNorm(32, c) as the original; narrower (tiny) widths use the largest group count dividing c."""
    return nn.GroupNorm(math.gcd(32, c), c)


class Discriminator(nn.Module):
    """PatchGAN-style discriminator (MaskBit): images in [0, 1] as they are, [B, 3, H, W] -> logits
    [B, 1, pool_size, pool_size]. State-dict names as the original's (manifests/discriminator.txt).

    base_channels: width of the 5x5 stem; channel_mult: one entry per stage, the stage's width as a multiple of
    base_channels (defaults 128 and (1, 2, 4): 128 -> 128 -> 256 -> 512); pool_size: the adaptive max pool
    after the stages (16: 256 px images give 32x32 features, pooled to 16x16).
    """

    def __init__(self, base_channels=128, channel_mult=(1, 2, 4), pool_size=16, in_channels=3):
        super().__init__()
        widths = [base_channels] + [base_channels * m for m in channel_mult]
        self.block_in = nn.Sequential(nn.Conv2d(in_channels, widths[0], 5, padding=2), nn.LeakyReLU(0.1))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, padding=1), BlurDownsample(), _group_norm(b), nn.LeakyReLU(0.1))
            for a, b in zip(widths, widths[1:]))
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.to_logits = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 1), nn.LeakyReLU(0.1),
                                       nn.Conv2d(widths[-1], 1, 5, padding=2))

    def forward(self, x):
        x = self.block_in(x)
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.pool(x))  # B, 1, pool_size, pool_size


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) (taming/MaskBit)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_adv_loss(logits_fake):
    """Generator adversarial loss -mean(D(x_rec)) on discriminator logits of reconstructions."""
    return -logits_fake.mean()


# --------------------------------------------------------------------------------------------------
# The original's criterion (mse_lpips_gan.py): reconstruction, perceptual, quantizer and GAN terms in float32
# --------------------------------------------------------------------------------------------------

# LPIPS early in each stage avoids blank or noisy reconstructions (the original's phase weights).
EARLY, LATE = dict(lpips=1.0, convnext=0.1), dict(lpips=0.0, convnext=1.0)


def loss_weights(args, step, have_lpips):
    """The phase's loss weights: EARLY before --lpips-until (LATE throughout without the LPIPS network), the
    adversarial term from --gan-start."""
    weights = dict(EARLY if step < args.lpips_until and have_lpips else LATE)
    return dict(weights, gan=args.gan_weight if 0 <= args.gan_start <= step else 0.0)


def tokenizer_losses(out, images, nets, disc, weights, cfg, aux_weight):
    """The original's criterion, in float32 with autocast off: reconstruction (+ aux), perceptual (LPIPS
    and ConvNeXt at the phase's weights; nets: LossNetworks), quantizer (stage 1) and adversarial terms; their
    sum is "loss"."""
    convnext, lpips_net = nets
    with torch.autocast(images.device.type, enabled=False):
        recon = out["recon"].float()
        aux = None if out["aux"] is None else out["aux"].float()
        parts = {"rec": alitok.reconstruction_loss(images, dict(recon=recon, aux=aux), cfg.patch_size,
                                                   cfg.n_prefix, aux_weight)}
        if lpips_net is not None and weights["lpips"] > 0:
            parts["lpips"] = lpips(lpips_net, recon, images)
        if convnext is not None:
            parts["convnext"] = perceptual_loss(convnext, recon, images)
        if "lpips" in parts or "convnext" in parts:
            parts["perceptual"] = (weights["lpips"] * parts.get("lpips", 0.0)
                                   + weights["convnext"] * parts.get("convnext", 0.0))
        if "vq_loss" in out:
            parts["quantizer"] = out["vq_loss"]
        if weights["gan"] > 0:
            parts["gen_adv"] = weights["gan"] * generator_adv_loss(disc(recon))
        parts["loss"] = sum(parts[k] for k in ("rec", "perceptual", "quantizer", "gen_adv") if k in parts)
    return parts


def discriminator_loss(disc, images, fake, weight):
    """weight * hinge loss of D on real images and detached reconstructions (one pass, float32, autocast
    off); (loss, real logits, fake logits)."""
    with torch.autocast(images.device.type, enabled=False):
        real, fake = disc(torch.cat([images, fake.detach().float()])).chunk(2)
        return weight * hinge_d_loss(real, fake), real, fake


# --------------------------------------------------------------------------------------------------
# A run's loss networks: switched on by flags, their standard weight files fetched on first use
# --------------------------------------------------------------------------------------------------

class LossNetworks(NamedTuple):
    """The frozen networks of the perceptual terms; None where that loss is off."""
    convnext: nn.Module    # ConvNeXt-S of the perceptual loss, or None
    lpips: nn.Module       # LPIPS (VGG16 and the v0.1 heads), or None


def loss_networks(args, device, log):
    """LossNetworks: ConvNeXt-S and LPIPS, each on by --perceptual-loss / --lpips-loss (default: on, except for
    the tiny preset, which needs no download; a weights path given switches it on), frozen."""
    wanted = lambda switch, path: switch if switch is not None else path is not None or args.preset != "tiny"
    convnext = lpips_net = None
    if wanted(args.perceptual_loss, args.perceptual_weights):
        path = loss_file(weights.CONVNEXT_WEIGHTS, args.perceptual_weights, args, "--no-perceptual-loss")
        convnext = load_convnext(path).to(device)
    if wanted(args.lpips_loss, args.lpips_weights):
        vgg, lin = args.lpips_weights or (None, None)
        lpips_net = load_lpips(loss_file(weights.VGG16_WEIGHTS, vgg, args, "--no-lpips-loss"),
                               loss_file(weights.LPIPS_WEIGHTS, lin, args, "--no-lpips-loss")).to(device)
    off = [name for name, net in (("ConvNeXt-S perceptual", convnext), ("LPIPS", lpips_net)) if net is None]
    if off:
        log.info(f"{' and '.join(off)} loss off: pass --perceptual-loss / --lpips-loss to use them (their "
                 f"standard weights are downloaded on first use into {weights.weights_cache()})")
    return LossNetworks(convnext, lpips_net)


def loss_file(name, path, args, switch_off):
    """The path of a loss network's standard weight file (an explicit path wins); the error, if it cannot be
    had, also says how to train without that loss."""
    try:
        return weights.standard_weights(name, path, args.offline, progress=not args.no_progress)
    except (OSError, ValueError) as error:
        kind = ValueError if isinstance(error, ValueError) else FileNotFoundError
        raise kind(f"{error}. To train without this loss, pass {switch_off}.") from None
