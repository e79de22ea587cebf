"""AliTok: an aligned tokenizer (bidirectional encoder, causal decoder) and a LlamaGen-style generator.

Read beside "AliTok: Towards Sequence Modeling Alignment between Tokenizer and Autoregressive Model"
(arXiv 2506.05289). Sections follow the paper: configurations, the tokenizer (encoder, quantizer, the
causal stage-1 and bidirectional stage-2 decoders), the autoregressive generator with its rotary layout,
KV-cached sampling with the power-cosine guidance schedule, and loading of the released weights.
"""
import math
import os
import weakref
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Configurations (Sec. 4, implementation details). Every size is a field; derived sizes are properties.
# ----------------------------------------------------------------------------------------------------

@dataclass
class TokenizerConfig:
    image_size: int = 256     # input side in pixels (square images)
    patch_size: int = 16      # encoder patch and decoder pixel-patch side
    enc_width: int = 768      # encoder transformer width
    enc_layers: int = 12
    enc_heads: int = 12
    dec_width: int = 1024     # decoder transformer width
    dec_layers: int = 24
    dec_heads: int = 16
    codebook_size: int = 4096  # number of codes K
    codebook_dim: int = 32    # dimension of each code
    n_prefix: int = -1        # prefix tokens before the image tokens; -1 means 1 + grid (the released 17)
    causal: bool = False      # decoder attention: causal (stage 1) or bidirectional (stage 2)
    n_buffer: int = 32        # learned tokens prepended in the decoder: 1 start token (stage 1), 32 buffers (stage 2)
    aux_head: bool = False    # stage-1 head that makes the prefix reconstruct the first patch row
    track_usage: bool = False  # clustering codebook update in training (stage 1), with its `embed_prob` buffer

    def __post_init__(self):
        if self.n_prefix < 0:
            self.n_prefix = 1 + self.grid
        assert self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"
        assert self.enc_width % self.enc_heads == 0 and self.dec_width % self.dec_heads == 0
        assert not self.aux_head or self.n_prefix == 1 + self.grid, \
            "the aux head reads the prefix as one patch plus the first patch row: needs n_prefix = 1 + grid"

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def n_image(self):
        return self.grid ** 2

    @property
    def n_tokens(self):
        return self.n_prefix + self.n_image


# Stage settings: stage 1 trains against a causal decoder with one start token, the aux head and the clustering
# codebook update; stage 2 trains a bidirectional decoder with buffer tokens on the frozen codes, in the layout of
# the released inference file (the original's stage 2 runs without clustering, so without `embed_prob`).
STAGES = {
    1: dict(causal=True, n_buffer=1, aux_head=True, track_usage=True),
    2: dict(causal=False, aux_head=False, track_usage=False),
    "inference": dict(causal=False, aux_head=False, track_usage=False),
}

TOKENIZER_PRESETS = {
    "alitok": TokenizerConfig(),   # the released ImageNet-256 tokenizer
    "tiny": TokenizerConfig(image_size=32, patch_size=4, enc_width=128, enc_layers=2, enc_heads=4,
                            dec_width=128, dec_layers=2, dec_heads=4, codebook_size=256, codebook_dim=16,
                            n_buffer=4),
}


def tokenizer_config(preset="alitok", stage="inference", **overrides):
    """The config of a preset tokenizer at a stage (1, 2 or "inference"), with field overrides."""
    kw = {**STAGES[stage], **overrides}
    if kw.get("n_prefix", TOKENIZER_PRESETS[preset].n_prefix) == 0:
        kw["aux_head"] = False          # the "no prefix" ablation has nothing for the aux head to read
    return replace(TOKENIZER_PRESETS[preset], **kw)


def ffn_hidden(width):
    """SwiGLU hidden size: int(2 * 4 * width / 3) rounded up to a multiple of 256 (LlamaGen)."""
    hidden = int(2 * 4 * width / 3)
    return 256 * math.ceil(hidden / 256)


@dataclass
class ARConfig:
    width: int = 768
    layers: int = 24
    heads: int = 16
    codebook_size: int = 4096   # code vocabulary (must equal the tokenizer's)
    num_classes: int = 1000
    n_prefix: int = 17          # tokenizer prefix tokens: 1-D rotary positions
    grid: int = 16              # tokenizer grid side: 2-D rotary positions
    rope_base: float = 10000.0
    dropout: float = 0.1        # attention, residual and FFN dropout in training
    token_dropout: float = 0.1  # dropout on the input embeddings in training
    class_dropout: float = 0.1  # probability of replacing the class by the null class in training
    cfg_scale: float = 16.0     # released guidance scale g for this size
    cfg_power: float = 1.8      # released guidance power p for this size

    def __post_init__(self):
        assert self.width % self.heads == 0 and self.head_dim % 4 == 0, "2-D rotary needs head_dim % 4 == 0"

    @property
    def head_dim(self):
        return self.width // self.heads

    @property
    def n_tokens(self):
        return self.n_prefix + self.grid ** 2

    @property
    def vocab_size(self):
        return self.codebook_size + 1 + self.num_classes + 1   # codes, one unused id, classes, null class

    @property
    def null_class(self):
        return self.codebook_size + 1 + self.num_classes


GENERATOR_PRESETS = {
    "B": ARConfig(width=768, layers=24, heads=16, cfg_scale=16.0, cfg_power=1.8),
    "L": ARConfig(width=1024, layers=24, heads=16, cfg_scale=6.0, cfg_power=0.7),
    "XL": ARConfig(width=1280, layers=32, heads=16, cfg_scale=13.0, cfg_power=1.4),
    "tiny": ARConfig(width=128, layers=4, heads=4, codebook_size=256, num_classes=10, n_prefix=9, grid=8,
                     cfg_scale=3.0, cfg_power=1.0),
}


def generator_config(preset="B", tokenizer=None, **overrides):
    """The config of a preset generator, sized to a tokenizer config's tokens if one is given."""
    if tokenizer is not None:
        overrides = dict(codebook_size=tokenizer.codebook_size, n_prefix=tokenizer.n_prefix,
                         grid=tokenizer.grid, **overrides)
    return replace(GENERATOR_PRESETS[preset], **overrides)


# ----------------------------------------------------------------------------------------------------
# Tokenizer transformer blocks (Sec. 3, tokenizer architecture; TiTok-style ViT, pre-norm)
# ----------------------------------------------------------------------------------------------------

_packed = weakref.WeakKeyDictionary()   # first nn.Linear -> (versions of the weights, their packed copy)


def linear(x, *layers, residual=None):
    """x times each layer's weights, in the dtype they are held in (see hold_weights): x is cast, the weights
    never are. Several layers: a tuple of their outputs (SwiGLU's two input products). residual: added to
    the output (a skip connection; one layer only). Layers are all with or all without bias.

    Without autograd on a CPU, large weights are read from a copy in oneDNN's blocked layout, made once per
    weight version, several layers' weights stacked into one product, a float32 residual added inside it:
    skinny products (a decode step multiplies 8 to 64 rows) run about twice as fast from that layout as
    from the plain one, which MKL re-packs at every call.
    """
    w, x = layers[0].weight, x.to(layers[0].weight.dtype)
    if (x.device.type != "cpu" or torch.is_grad_enabled() or w.numel() < 2 ** 18    # small: MKL runs them well
            or torch.compiler.is_compiling() or not torch.backends.mkldnn.is_available()):
        ys = tuple(F.linear(x, m.weight, m.bias) for m in layers)
    else:
        key = tuple((m.weight.data_ptr(), m.weight._version, m.weight.dtype) for m in layers)
        entry = _packed.get(layers[0])
        if entry is None or entry[0] != key:
            stacked = torch.cat([m.weight.detach() for m in layers]) if len(layers) > 1 else w.detach()
            entry = _packed[layers[0]] = (key, torch.ops.mkldnn._reorder_linear_weight(stacked, 8))
        bias = layers[0].bias if len(layers) == 1 or layers[0].bias is None else torch.cat([m.bias for m in layers])
        if residual is not None and residual.dtype == w.dtype:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, entry[1], bias, "add")
        y = torch.ops.mkldnn._linear_pointwise(x, entry[1], bias, "none", [], "")
        ys = y.split([m.out_features for m in layers], -1) if len(layers) > 1 else (y,)
    if len(ys) > 1:
        return ys
    return ys[0] if residual is None else residual + ys[0]


class Attention(nn.Module):
    """Multi-head attention with one packed [q | k | v] projection (names follow the released weights)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, T, C = x.shape
        q, k, v = linear(x, self.in_proj).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # Attention in float32 whatever the autocast dtype, as the released code does.
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return linear(y.to(x.dtype).transpose(1, 2).reshape(B, T, C), self.out_proj)


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return linear(F.gelu(linear(x, self.c_fc)), self.c_proj)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def conv1x1(x, conv):
    """A 1x1 Conv2d applied per token: [B, T, C_in] -> [B, T, C_out]."""
    return F.linear(x, conv.weight[:, :, 0, 0], conv.bias)


def unpatchify(x, grid_h, grid_w, patch):
    """[B, grid_h*grid_w, patch*patch*3] with channel (p1*patch + p2)*3 + c -> [B, 3, grid_h*patch, grid_w*patch]."""
    B = x.shape[0]
    x = x.view(B, grid_h, grid_w, patch, patch, 3)          # b h w p1 p2 c
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, 3, grid_h * patch, grid_w * patch)


# ----------------------------------------------------------------------------------------------------
# Encoder (Sec. 3, the aligned tokenizer): bidirectional ViT over [image patches, latent tokens]; keeps the latent outputs
# ----------------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        W = cfg.enc_width
        self.patch_embed = nn.Conv2d(3, W, cfg.patch_size, stride=cfg.patch_size)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.n_image, W) * W ** -0.5)
        self.latent_token_positional_embedding = nn.Parameter(torch.randn(cfg.n_tokens, W) * W ** -0.5)
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList(Block(W, cfg.enc_heads) for _ in range(cfg.enc_layers))
        self.ln_post = nn.LayerNorm(W)
        self.conv_out = nn.Conv2d(W, cfg.codebook_dim, 1)

    def forward(self, images, latent_tokens):
        """images [B, 3, H, W] in [0, 1], latent_tokens [T, W] -> continuous latents z [B, T, codebook_dim]."""
        B = images.shape[0]
        patches = self.patch_embed(images).flatten(2).transpose(1, 2) + self.positional_embedding  # B, N, W
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)
        x = self.ln_pre(torch.cat([patches, latents.to(patches.dtype)], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, patches.shape[1]:])
        return conv1x1(x, self.conv_out)


# ----------------------------------------------------------------------------------------------------
# Vector quantizer (Sec. 3, the aligned tokenizer) with the clustering codebook update of CVQ-VAE used in stage 1
# ----------------------------------------------------------------------------------------------------

def code_distances(z, embedding):
    """Squared Euclidean distances [N, K] between vectors z [N, D] and codes [K, D], in float32."""
    z, e = z.float(), embedding.float()
    return z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()


def codebook_stats(z, embedding):
    """Per-code statistics of a batch z [N, D]: counts [K], distance to the nearest batch vector [K], that vector [K, D]."""
    d = code_distances(z, embedding)
    counts = torch.bincount(d.argmin(1), minlength=embedding.shape[0]).float()
    nearest, idx = d.min(0)
    return counts, nearest, z.float()[idx]


def gather_codebook_stats(counts, nearest, anchors):
    """Combine codebook_stats over all processes: summed counts, and each code's anchor from the closest rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts, anchors
    world = dist.get_world_size()
    dist.all_reduce(counts)
    all_nearest = [torch.empty_like(nearest) for _ in range(world)]
    all_anchors = [torch.empty_like(anchors) for _ in range(world)]
    dist.all_gather(all_nearest, nearest)
    dist.all_gather(all_anchors, anchors)
    best = torch.stack(all_nearest).argmin(0)               # ties go to the lowest rank = first in batch order
    return counts, torch.stack(all_anchors)[best, torch.arange(len(best), device=best.device)]


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        if cfg.track_usage:
            self.register_buffer("embed_prob", torch.zeros(cfg.codebook_size))

    def forward(self, z):
        """z [B, T, D] -> (straight-through z_q [B, T, D], codes int64 [B, T], commitment + codebook loss).

        In float32 whatever the autocast, as the released code. In training with clustering on, the codebook
        update runs after the codes, z_q and the loss were taken from the old codebook (the original's order).
        """
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            codes = self.nearest_codes(z)
            zq = self.embedding(codes)
            loss = 0.25 * F.mse_loss(z, zq.detach()) + F.mse_loss(zq, z.detach())
            if self.training and hasattr(self, "embed_prob"):
                self.cluster_update_(z.detach())
            return z + (zq - z).detach(), codes, loss

    def nearest_codes(self, z):
        """z [B, T, D] -> codes int64 [B, T]: the nearest code of each vector (float32 distances)."""
        return code_distances(z.reshape(-1, z.shape[-1]), self.embedding.weight).argmin(1).view(z.shape[:-1])

    @torch.no_grad()
    def cluster_update_(self, z, decay=0.99):
        """Pull rarely used codes onto live encoder outputs z [..., D] (gathered over all processes)."""
        K = self.embedding.weight.shape[0]
        stats = codebook_stats(z.reshape(-1, z.shape[-1]), self.embedding.weight)
        counts, anchors = gather_codebook_stats(*stats)
        self.embed_prob.mul_(decay).add_(counts / counts.sum(), alpha=1 - decay)
        w = torch.exp(-(self.embed_prob * K * 10) / (1 - decay) - 1e-3).unsqueeze(1)
        # .data: the gradient of this step still lands on the replaced rows, as in the original.
        self.embedding.weight.data.mul_(1 - w).add_(anchors * w)


# ----------------------------------------------------------------------------------------------------
# Decoder (Sec. 3: stage 1 causal + prefix tokens + aux loss; stage 2 bidirectional + buffer tokens)
# ----------------------------------------------------------------------------------------------------

class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        W, out = cfg.dec_width, cfg.patch_size ** 2 * 3
        # The released name for the prepended learned tokens (start token or buffer tokens).
        self.class_embedding = nn.Parameter(torch.randn(cfg.n_buffer, W) * W ** -0.5)
        self.latent_token_positional_embedding = nn.Parameter(
            torch.randn(cfg.n_buffer + cfg.n_tokens, W) * W ** -0.5)
        self.decoder_embed = nn.Linear(cfg.codebook_dim, W)
        self.ln_pre = nn.LayerNorm(W)
        self.transformer = nn.ModuleList(Block(W, cfg.dec_heads) for _ in range(cfg.dec_layers))
        self.ln_post = nn.LayerNorm(W)
        self.ffn = nn.Sequential(nn.Conv2d(W, out, 1))      # a Sequential only for the released name ffn.0
        self.conv_out = nn.Conv2d(3, 3, 1)
        if cfg.aux_head:
            self.ffn_aux = nn.Sequential(nn.Conv2d(W, out, 1))
            self.conv_out_aux = nn.Conv2d(3, 3, 1)

    def forward(self, zq):
        """Quantized latents [B, T, D] -> (image [B, 3, H, W] in [0, 1], aux strip [B, 3, P, (1+grid)*P] or None)."""
        cfg, B = self.cfg, zq.shape[0]
        x = self.decoder_embed(zq)
        x = torch.cat([self.class_embedding.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.latent_token_positional_embedding)
        for block in self.transformer:
            x = block(x, causal=cfg.causal)
        x = self.ln_post(x[:, cfg.n_buffer:])               # B, T, W: one output per latent token
        image = self.pixels(x[:, cfg.n_prefix:], self.ffn, self.conv_out, cfg.grid, cfg.grid)
        aux = None
        if cfg.aux_head:                                    # the prefix outputs as a 1 x (1 + grid) patch strip
            aux = self.pixels(x[:, :cfg.n_prefix], self.ffn_aux, self.conv_out_aux, 1, cfg.n_prefix)
        return image, aux

    def pixels(self, x, ffn, conv_out, grid_h, grid_w):
        """Token features [B, h*w, W] -> pixels [B, 3, h*P, w*P] in [0, 1]."""
        x = unpatchify(conv1x1(x, ffn[0]), grid_h, grid_w, self.cfg.patch_size)
        return torch.sigmoid(F.conv2d(x, conv_out.weight, conv_out.bias))


def aux_target(images, patch_size):
    """The aux strip's target: the top-left patch beside the whole first patch row, [B, 3, P, P + W]."""
    top = images[:, :, :patch_size]
    return torch.cat([top[..., :patch_size], top], dim=-1)


def reconstruction_loss(images, out, patch_size, n_prefix, aux_weight=10.0):
    """Stage-1 pixel loss: mse(x, recon) + aux_weight * (n_prefix / n_image) * mse(aux target, aux)."""
    loss = F.mse_loss(out["recon"], images)
    if out["aux"] is not None:
        n_image = (images.shape[-1] // patch_size) ** 2
        loss = loss + aux_weight * n_prefix / n_image * F.mse_loss(out["aux"], aux_target(images, patch_size))
    return loss


# ----------------------------------------------------------------------------------------------------
# The tokenizer (Sec. 3, both stages): latent tokens, encoder, quantizer, decoder
# ----------------------------------------------------------------------------------------------------

def init_tokenizer_weights(module):
    """The original's init: truncated normal (std 0.02) weights and zero biases for every Linear, Conv and
    Embedding (the codebook); apply with Tokenizer.apply."""
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class Tokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.latent_tokens = nn.Parameter(torch.randn(cfg.n_tokens, cfg.enc_width) * cfg.enc_width ** -0.5)
        self.encoder = Encoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.decoder = Decoder(cfg)
        self.apply(init_tokenizer_weights)

    def forward(self, images):
        """images [B, 3, H, W] in [0, 1] -> dict: recon, aux (or None), codes, vq_loss. In training mode with
        clustering on (stage 1) this also updates the codebook."""
        zq, codes, vq_loss = self.quantize(self.encoder(images, self.latent_tokens))
        recon, aux = self.decoder(zq)
        return dict(recon=recon, aux=aux, codes=codes, vq_loss=vq_loss)

    @torch.no_grad()
    def encode(self, images):
        """images float [B, 3, H, W] in [0, 1] -> codes int64 [B, n_tokens]."""
        return self.quantize.nearest_codes(self.encoder(images, self.latent_tokens))

    @torch.no_grad()
    def decode(self, codes):
        """codes int64 [B, n_tokens] in [0, codebook_size) -> images float [B, 3, H, W] in [0, 1]."""
        return self.decoder(self.quantize.embedding(codes))[0]


# ----------------------------------------------------------------------------------------------------
# Autoregressive generator (Sec. 4, implementation details): LlamaGen decoder-only transformer over [class, tokens]
# ----------------------------------------------------------------------------------------------------

def rotary_table(cfg: ARConfig):
    """(cos, sin) per sequence position and rotated pair: [1 + n_tokens, head_dim/2, 2] (float32).

    Row 0 (the class token) is all zeros, which zeroes its q and k: a quirk inherited from LlamaGen that
    the released weights were trained with, kept for compatibility. Rows 1..n_prefix: 1-D rotary at
    positions 0..n_prefix-1. Then the grid in raster order: 2-D rotary, the first half of the pairs by
    (n_prefix + row), the second half by (n_prefix + column).
    """
    half = cfg.head_dim // 2
    freqs_1d = cfg.rope_base ** (-torch.arange(0, half).float() * 2 / cfg.head_dim)          # half
    freqs_2d = cfg.rope_base ** (-torch.arange(0, half // 2).float() * 2 / half)            # half / 2
    prefix_angles = torch.arange(cfg.n_prefix).float()[:, None] * freqs_1d                  # n_prefix, half
    rc = torch.arange(cfg.grid).float() + cfg.n_prefix
    rows = (rc[:, None, None] * freqs_2d).expand(cfg.grid, cfg.grid, half // 2)
    cols = (rc[None, :, None] * freqs_2d).expand(cfg.grid, cfg.grid, half // 2)
    grid_angles = torch.cat([rows, cols], dim=-1).reshape(cfg.grid ** 2, half)              # grid^2, half
    angles = torch.cat([prefix_angles, grid_angles])
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(1, half, 2), table])


def rotary_factors(rope):
    """rope [T, D/2, 2] -> [T, 1, 1, D/2] complex: cos + i sin per sequence position and rotated pair."""
    return torch.view_as_complex(rope.contiguous())[:, None, None]


def apply_rotary(x, rot):
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, 2, H, D] (q and k) by the angles of rotary_factors.

    Pair i, read as the complex number x[2i] + i x[2i+1], is multiplied by cos + i sin: it becomes
    (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), as the released code computes it.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rot).flatten(-2).type_as(x)


def rms_norm(x, weight, eps):
    """x divided by its root mean square over the last dimension (in float32, back in x's dtype), times weight."""
    if x.dtype == weight.dtype == torch.float32 and weight.shape == x.shape[-1:]:
        return F.rms_norm(x, x.shape[-1:], weight, eps)     # the same values, one small operation fewer
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


class KVCache(nn.Module):
    """One layer's keys and values for B sequences of up to T_max positions [B, H, T_max, D], written at explicit
    positions; a step attends over the filled first n positions only (the whole, static cache when compiled)."""

    def __init__(self, batch, heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        if self.k.is_cuda:      # written in place by captured CUDA graphs: their address must not move
            for buffer in (self.k, self.v):
                torch._dynamo.mark_static_address(buffer)

    def update(self, pos, k, v):
        """Write k, v [B, H, len(pos), D] at positions pos."""
        if len(pos) == 1 and self.k.device.type == "cpu" and not torch.compiler.is_compiling():
            self.k[:, :, int(pos)].copy_(k[:, :, 0])     # one eager CPU step: a plain copy, faster than index_copy_
            self.v[:, :, int(pos)].copy_(v[:, :, 0])
            return
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))

    def attend(self, q, mask):
        """Softmax attention of q [B, H, T, D] over the first n cache positions, plus the additive mask [T, n]."""
        n, q = mask.shape[-1], q.to(self.k.dtype)
        return F.scaled_dot_product_attention(q, self.k[:, :, :n], self.v[:, :, :n], attn_mask=mask.to(q.dtype))


class SelfAttention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads, self.head_dim, self.dropout = cfg.heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.cache = None

    def forward(self, x, residual, rope, pos=None, mask=None):
        """residual + attention(x): x [B, T, C]; rope: rotary_factors for the T positions; pos: None (causal over
        x) or the T cache positions x occupies, then the additive mask [T, n] (0 or -inf) covers the first n
        cache positions."""
        B, T, C = x.shape
        qkv = linear(x, self.qkv).view(B, T, 3, self.heads, self.head_dim)
        # q and k normalised (each by its own weights, in float32) and rotated together: half the small
        # operations per step
        norms = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]                 # 2, 1, D
        q, k = apply_rotary(rms_norm(qkv[:, :, :2].float(), norms, self.q_norm.eps), rope).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, qkv[:, :, 2]))     # B, H, T, D
        if pos is None:
            y = F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            self.cache.update(pos, k, v)
            y = self.cache.attend(q, mask)
        y = y.transpose(1, 2).reshape(B, T, C)
        if self.training:
            return residual + F.dropout(linear(y, self.proj), self.dropout, True)
        return linear(y, self.proj, residual=residual)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        hidden = ffn_hidden(cfg.width)
        self.w1 = nn.Linear(cfg.width, hidden, bias=False)
        self.w3 = nn.Linear(cfg.width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.width, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, residual):
        """residual + SwiGLU(x)."""
        gate, up = linear(x, self.w1, self.w3)
        if self.training:
            return residual + F.dropout(linear(F.silu(gate) * up, self.w2), self.dropout, True)
        return linear(F.silu(gate) * up, self.w2, residual=residual)


class ARBlock(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.width), SelfAttention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.width), SwiGLU(cfg)

    def forward(self, x, rope, pos=None, mask=None):
        x = self.attn(self.norm1(x), x, rope, pos, mask)     # the skip connections: added inside the products
        return self.mlp(self.norm2(x), x)


class Generator(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.blocks = nn.ModuleList(ARBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        self.output = nn.Linear(cfg.width, cfg.codebook_size)
        self.register_buffer("rope", rotary_table(cfg), persistent=False)
        self.attend_block = 1   # decode steps attend to the filled cache rounded up to a multiple of this
        self.apply(self._init)
        nn.init.zeros_(self.output.weight)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def class_ids(self, classes):
        """Class indices [B] in [0, num_classes) (or -1 for the null class) -> vocabulary ids."""
        check_classes(classes.tolist(), self.config.num_classes, allow_null=True)
        return torch.where(classes < 0, self.config.null_class, classes + self.config.codebook_size + 1)

    def run(self, ids, pos=None, length=None):
        """Token ids [B, T] -> logits [B, T, codebook] in float32. pos None: positions 0..T-1, causal, no cache.
        Else the T cache positions of ids; each token sees the cache up to itself within its first `length`."""
        x = self.embeddings(ids)
        if self.training:
            x = F.dropout(x, self.config.token_dropout, True)
        mask = None
        if pos is not None:                                   # additive: 0 where a token sees a position, else -inf
            later = torch.arange(length, device=ids.device) > pos[:, None]
            mask = torch.zeros(later.shape, device=ids.device).masked_fill(later, float("-inf"))    # T, length
        rope = rotary_factors(self.rope[:ids.shape[1]] if pos is None else self.rope[pos])
        for block in self.blocks:
            x = block(x, rope, pos, mask)
        return linear(self.norm(x), self.output).float()

    def forward(self, codes, classes):
        """Teacher forcing: codes [B, T'] (T' <= n_tokens), classes [B] -> logits [B, T', codebook]; i predicts code i."""
        cls = self.class_ids(classes)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(cls.shape, device=cls.device) < self.config.class_dropout
            cls = torch.where(drop, self.config.null_class, cls)
        return self.run(torch.cat([cls[:, None], codes[:, :-1]], dim=1))

    # ---------------- KV-cached sampling (Sec. 4, sampling with the power-cosine schedule) ----------------

    def setup_cache(self, batch, dtype=None):
        """Preallocate every layer's KV cache for `batch` sequences of 1 + n_tokens positions (a cache of that
        shape is kept: compiled decoding captured its address). dtype: float32 on a CPU, whose bfloat16
        attention is slower than its float32 one, else the dtype the weights are held in."""
        w = self.blocks[0].attn.qkv.weight
        dtype = dtype or (torch.float32 if w.device.type == "cpu" else w.dtype)
        shape = (batch, self.config.heads, self.config.n_tokens + 1, self.config.head_dim)
        for block in self.blocks:
            cache = block.attn.cache
            if cache is None or cache.k.dtype != dtype or cache.k.numel() != math.prod(shape):
                block.attn.cache = KVCache(*shape, dtype, w.device)

    def free_cache(self):
        """Drop every layer's KV cache."""
        for block in self.blocks:
            block.attn.cache = None

    def prefill(self, ids):
        """Run the first tokens [B, T0] into the caches at positions 0..T0-1; logits [B, codebook] of the last."""
        return self.run(ids, torch.arange(ids.shape[1], device=ids.device), ids.shape[1])[:, -1]

    def decode_one_token(self, ids, pos, length):
        """One new token [B, 1] at cache position pos (a 1-element long tensor), attending over the first
        `length` > pos cache positions (later ones masked) -> logits [B, codebook]."""
        return self.run(ids, pos, length)[:, -1]

    @torch.no_grad()
    def generate(self, classes, cfg_scale=None, cfg_power=None, temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, seeds=None):
        """Sample codes [B, n_tokens] for class indices [B]: prefill the class token, then one decode step per code.

        Guidance follows the power-cosine schedule (cfg_schedule): the conditional and unconditional sequences
        run as one doubled batch; scale 1 runs no unconditional half. Randomness: one uniform per sample and
        step, from `seeds` (one int per sample: the result does not depend on batch composition) or else
        from `generator`. temperature 0 means argmax.
        """
        cfg = self.config
        g = cfg.cfg_scale if cfg_scale is None else cfg_scale
        p = cfg.cfg_power if cfg_power is None else cfg_power
        device = self.output.weight.device
        classes = torch.as_tensor(classes, device=device).long()
        B, T = len(classes), cfg.n_tokens
        u = sample_uniforms(B, T, generator, seeds).to(device)
        ids = self.class_ids(classes)[:, None]
        if g != 1.0:
            ids = torch.cat([ids, torch.full_like(ids, cfg.null_class)])
        codes = torch.zeros(B, T, dtype=torch.long, device=device)
        positions, block = torch.arange(T + 1, device=device), self.attend_block   # positions: no copy per step
        self.setup_cache(len(ids))
        logits = self.prefill(ids)
        for s in range(T):
            if g != 1.0:
                cond, uncond = logits.chunk(2)
                logits = uncond + cfg_schedule(s, T, g, p) * (cond - uncond)
            codes[:, s] = sample_token(logits, u[:, s], temperature, top_k, top_p)
            if s + 1 < T:
                token = codes[:, s:s + 1].repeat(len(ids) // B, 1)
                length = min(-(-(s + 2) // block) * block, T + 1)
                logits = self.decode_one_token(token, positions[s + 1:s + 2], length)
        if block == 1:                                         # compiled steps keep theirs: graphs hold its address
            self.free_cache()
        return codes


def compile_decode(generator, block=None):
    """torch.compile the one-token decode step; on a GPU each step replays a captured CUDA graph. Steps attend
    over the filled cache rounded up to a multiple of `block` positions (default: the whole cache, one fixed
    shape); a smaller block reads less of the cache at the price of one graph per shape. Callers pad batches
    to one size."""
    mode = "reduce-overhead" if generator.output.weight.device.type == "cuda" else None
    step = torch.compile(generator.decode_one_token, mode=mode, fullgraph=True,
                         dynamic=False if block is None else None)   # block: recompiled once, shapes symbolic

    def decode_one_token(ids, pos, length):
        torch.compiler.cudagraph_mark_step_begin()     # the last step's logits are used up: its buffers may be reused
        return step(ids, pos, length)
    generator.attend_block, generator.decode_one_token = block or generator.rope.shape[0], decode_one_token
    return generator


def hold_weights(model, dtype):
    """Hold the matmul weights of every transformer block (Generator and Tokenizer) in dtype, cast once: bfloat16
    halves what each step reads. Norms, embeddings, output heads and the rotary table stay float32; linear()
    casts each product's input; the residual stream, logits, guidance and sampling stay float32 (attention
    runs in the KV cache's dtype: float32 on a CPU, the weights' on a GPU)."""
    for block in model.modules():
        if isinstance(block, (Block, ARBlock)):
            for layer in block.modules():
                if isinstance(layer, nn.Linear):
                    layer.to(dtype)
    return model


def check_classes(classes, num_classes, allow_null=False):
    """Raise ValueError unless every class index lies in [0, num_classes) (or is -1, the null class, if allowed)."""
    bad = [c for c in classes if not (0 <= c < num_classes or (allow_null and c == -1))]
    if bad:
        raise ValueError(f"class indices must lie in [0, {num_classes}) for this generator"
                         f"{' (-1 = unconditional)' if allow_null else ''}; got {bad[:8]}")


def cfg_schedule(step, n_steps, scale, power):
    """Guidance scale at step in [0, n_steps): 1 + (scale - 1) * (1 - cos(pi * (step / n_steps) ** power)) / 2."""
    return 1 + (scale - 1) * (1 - math.cos(math.pi * (step / n_steps) ** power)) / 2


def sample_uniforms(batch, n_steps, generator=None, seeds=None):
    """Uniforms [batch, n_steps] in [0, 1): per-sample streams from seeds, else one stream from generator."""
    if seeds is None:
        return torch.rand(batch, n_steps, generator=generator)
    if len(seeds) != batch:
        raise ValueError(f"one seed per sample: got {len(seeds)} seeds for {batch} samples")
    return torch.stack([torch.rand(n_steps, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample_token(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Draw one code per row of logits [B, V] by inverse CDF at uniforms u [B] (multinomial sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p          # keeps at least the most likely code
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(1), right=True)
    return idx.squeeze(1).clamp_max(logits.shape[-1] - 1)


# ----------------------------------------------------------------------------------------------------
# Loading: released weights and this project's checkpoints, strictly
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


def infer_tokenizer_config(state):
    """The TokenizerConfig implied by a tokenizer state dict's names and shapes (heads: head_dim 64)."""
    n_layers = lambda p: len({k.split(".")[2] for k in state if k.startswith(p + ".transformer.")})
    enc_w = state["latent_tokens"].shape[1]
    dec_w = state["decoder.decoder_embed.weight"].shape[0]
    patch = state["encoder.patch_embed.weight"].shape[-1]
    grid = math.isqrt(state["encoder.positional_embedding"].shape[0])
    n_tokens = state["latent_tokens"].shape[0]
    aux = "decoder.ffn_aux.0.weight" in state
    return TokenizerConfig(
        image_size=grid * patch, patch_size=patch, enc_width=enc_w, enc_layers=n_layers("encoder"),
        enc_heads=max(1, enc_w // 64), dec_width=dec_w, dec_layers=n_layers("decoder"),
        dec_heads=max(1, dec_w // 64), codebook_size=state["quantize.embedding.weight"].shape[0],
        codebook_dim=state["quantize.embedding.weight"].shape[1], n_prefix=n_tokens - grid * grid,
        causal=aux, n_buffer=state["decoder.class_embedding"].shape[0], aux_head=aux,
        track_usage="quantize.embed_prob" in state)


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


def load_tokenizer(path_or_state_dict, map_location="cpu"):
    """A Tokenizer (eval mode) from the released AliTok.pth, a stage-1/2 training state or our checkpoint."""
    state, saved = _state_dict_of(path_or_state_dict)
    if saved is None and "tokenizer" in state and isinstance(state["tokenizer"], dict):
        state, saved = state["tokenizer"], state.get("tokenizer_config")
    inferred = infer_tokenizer_config(state) if "latent_tokens" in state else None
    cfg = _config_from(TokenizerConfig, saved) if saved else inferred
    if cfg is None:
        raise ValueError("not a tokenizer checkpoint: no `latent_tokens` tensor and no saved config")
    if saved is None:
        preset = TOKENIZER_PRESETS["alitok"]            # the released shapes: take the released head counts
        if (cfg.enc_width, cfg.dec_width) == (preset.enc_width, preset.dec_width):
            cfg = replace(cfg, enc_heads=preset.enc_heads, dec_heads=preset.dec_heads)
    model = load_strict(Tokenizer(cfg), state, fits=inferred)
    return model.to(map_location).eval()


def load_generator(path_or_state_dict, map_location="cpu", **overrides):
    """A Generator (eval mode) from the released alitok_{b,l,xl}.bin or this project's checkpoint."""
    state, saved = _state_dict_of(path_or_state_dict)
    if saved is None and "generator" in state and isinstance(state["generator"], dict):
        state, saved = state["generator"], state.get("generator_config")
    if "embeddings.weight" not in state:
        raise ValueError("not a generator checkpoint: no `embeddings.weight` tensor and no saved config")
    inferred = infer_generator_config(state, **overrides)
    cfg = replace(_config_from(ARConfig, saved), **overrides) if saved else inferred
    model = load_strict(Generator(cfg), state, fits=inferred)
    return model.to(map_location).eval()


def checkpoint(model):
    """A self-contained checkpoint dict: the model's config and state, rebuilt by load_tokenizer/load_generator."""
    return {"config": asdict(model.config), "model": model.state_dict()}


def codebook_fingerprint(tokenizer):
    """16 hex digits of SHA-256 over a tokenizer's codebook (its shape, then its weights as float32 bytes): equal
    for tokenizers whose codes mean the same vectors, different (up to 2^-64) for any other codebook."""
    import hashlib
    codebook = tokenizer.quantize.embedding.weight.detach().float().cpu().contiguous()
    digest = hashlib.sha256(str(tuple(codebook.shape)).encode())
    digest.update(codebook.numpy().tobytes())
    return digest.hexdigest()[:16]
