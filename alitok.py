"""AliTok: an aligned tokenizer (bidirectional encoder, causal decoder) and a LlamaGen-style generator.

Read beside "AliTok: Towards Sequence Modeling Alignment between Tokenizer and Autoregressive Model"
(arXiv 2506.05289). Sections follow the paper: the tokenizer (encoder, quantizer, the causal stage-1 and
bidirectional stage-2 decoders), the autoregressive generator with its rotary layout, KV-cached sampling with
the power-cosine guidance schedule; the configurations, presets and training-stage settings close the file.
Loading the released weights is checkpoints.py.

This file is the model and nothing else: plain nn.Linear products, the skip connections where the paper has
them, one KV cache. What makes it fast on some hardware (packed CPU products, weights held in bfloat16,
compiled decoding) is applied to a built model by speed.py; the tests hold the two equal.
"""
from __future__ import annotations   # the configs close the file: annotations name them before they exist

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------
# Tokenizer transformer blocks (Sec. 3, tokenizer architecture; TiTok-style ViT, pre-norm)
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention with one packed [q | k | v] projection (names follow the released weights)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        B, T, C = x.shape
        q, k, v = self.in_proj(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        # q, k, v in float32, as the released code casts them: outside autocast attention runs in float32.
        # Under autocast scaled_dot_product_attention is one of autocast's lower-precision ops, so there it runs
        # in the autocast dtype whatever its inputs (in the released code as here).
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        return self.out_proj(y.to(x.dtype).transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln_2, self.mlp = nn.LayerNorm(width), MLP(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def conv1x1(x, conv):
    """A 1x1 Conv2d applied per token: [B, T, C_in] -> [B, T, C_out] (the released heads are convolutions)."""
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
        B, dtype = images.shape[0], self.patch_embed.weight.dtype
        patches = self.patch_embed(images.to(dtype)).flatten(2).transpose(1, 2) + self.positional_embedding
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(B, -1, -1)
        x = self.ln_pre(torch.cat([patches, latents.to(patches.dtype)], dim=1))    # B, N + T, W
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
    # a fixed-size count: bincount reads its largest value back to the host on a GPU
    counts = d.new_zeros(embedding.shape[0]).index_add_(0, d.argmin(1), d.new_ones(len(d)))
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
        if cfg.cluster_codebook:
            self.register_buffer("embed_prob", torch.zeros(cfg.codebook_size))

    def forward(self, z):
        """z [B, T, D] -> (straight-through z_q [B, T, D], codes int64 [B, T], commitment + codebook loss).

        In float32 whatever the autocast, as the released code. In training with clustering on, the codebook
        update runs after the codes, z_q and the loss were taken from the old codebook (the original's order).
        """
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            codes = self.nearest_codes(z)
            zq = F.embedding(codes, self.embedding.weight.float())
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
        # The learned tokens before the latents: stage 1's start token or stage 2's buffer tokens. Weight
        # compatibility: registered under the name of the released files and of the original's parameters.
        self.class_embedding = nn.Parameter(torch.randn(cfg.n_leading, W) * W ** -0.5)
        self.latent_token_positional_embedding = nn.Parameter(
            torch.randn(cfg.n_leading + cfg.n_tokens, W) * W ** -0.5)
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
        x = self.decoder_embed(zq.to(self.decoder_embed.weight.dtype))
        x = torch.cat([self.class_embedding.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = self.ln_pre(x + self.latent_token_positional_embedding)
        for block in self.transformer:
            x = block(x, causal=cfg.causal)
        x = self.ln_post(x[:, cfg.n_leading:])              # B, T, W: one output per latent token
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
    """The aux strip's target: the top-left patch beside the whole first patch row of images [B, 3, H, image_width]
    -> [B, 3, P, P + image_width]."""
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
        """codes int64 [B, n_tokens] in [0, codebook_size) -> images [B, 3, H, W] in [0, 1], the model's dtype."""
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


def apply_rotary(x, rope):
    """Rotate the interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by rope [T, D/2, 2] (cos, sin): pair i
    becomes (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin), in float32, as the released code."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)         # B, T, H, D/2 each
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]        # T, 1, D/2
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        """x divided by its root mean square over the last dimension, times weight, in float32, back in x's dtype."""
        return F.rms_norm(x.float(), x.shape[-1:], self.weight.float(), self.eps).type_as(x)


class KVCache(nn.Module):
    """One layer's keys and values for B sequences of up to T_max positions [B, H, T_max, D], written at explicit
    positions (LlamaGen / gpt-fast)."""

    def __init__(self, batch, heads, max_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v, length):
        """Write k, v [B, H, len(pos), D] at positions pos; the keys and values of the first `length` positions."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k[:, :, :length], self.v[:, :, :length]


class SelfAttention(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.heads, self.head_dim, self.dropout = cfg.heads, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.q_norm, self.k_norm = RMSNorm(cfg.head_dim), RMSNorm(cfg.head_dim)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.cache = None

    def setup_cache(self, batch, max_len, dtype=None):
        """This layer's KV cache for `batch` sequences of max_len positions in dtype (default: the dtype of its
        products' weights), kept where one of that shape and dtype is there."""
        w = self.qkv.weight
        shape, dtype = (batch, self.heads, max_len, self.head_dim), dtype or w.dtype
        if self.cache is None or self.cache.k.shape != shape or self.cache.k.dtype != dtype:
            self.cache = KVCache(*shape, dtype, w.device)

    def forward(self, x, rope, pos=None, mask=None):
        """x [B, T, C]; rope: the rotary table rows of the T positions. pos None: causal over x. Else x's T cache
        positions, and mask [T, n] (True where a token may attend) over the first n cache positions."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        q, k = apply_rotary(self.q_norm(q), rope), apply_rotary(self.k_norm(k), rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # B, H, T, D
        if pos is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v = self.cache.update(pos, k, v, mask.shape[-1])
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype)))


def ffn_hidden(width):
    """SwiGLU hidden size: int(2 * 4 * width / 3) rounded up to a multiple of 256 (LlamaGen)."""
    hidden = int(2 * 4 * width / 3)
    return 256 * math.ceil(hidden / 256)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        hidden = ffn_hidden(cfg.width)
        self.w1 = nn.Linear(cfg.width, hidden, bias=False)
        self.w3 = nn.Linear(cfg.width, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.width, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class ARBlock(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.width), SelfAttention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.width), SwiGLU(cfg)

    def forward(self, x, rope, pos=None, mask=None):
        x = x + self.attn(self.norm1(x), rope, pos, mask)
        return x + self.mlp(self.norm2(x))


class Generator(nn.Module):
    def __init__(self, cfg: ARConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.blocks = nn.ModuleList(ARBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.width)
        self.output = nn.Linear(cfg.width, cfg.codebook_size)
        # A plain float32 tensor, not a buffer, so that .to(dtype) leaves it float32 (the angles need its
        # precision); logits() moves it to the device of the ids, as LlamaGen does with freqs_cis.
        self.rope = rotary_table(cfg)
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
        return torch.where(classes < 0, self.config.null_class, classes + self.config.codebook_size + 1)

    def logits(self, ids, pos=None, length=None):
        """The forward pass over token ids [B, T] -> logits [B, T, codebook] in float32. pos None: positions 0..T-1,
        causal, no cache. Else the T cache positions of ids; each token sees the cache up to itself within its
        first `length`."""
        if self.rope.device != ids.device:
            self.rope = self.rope.to(ids.device)
        x = self.token_dropout(self.embeddings(ids))
        rope, mask = self.rope[:ids.shape[1]], None
        if pos is not None:
            rope, mask = self.rope[pos], torch.arange(length, device=ids.device) <= pos[:, None]   # T, length
        for block in self.blocks:
            x = block(x, rope, pos, mask)
        return self.output(self.norm(x)).float()

    def forward(self, codes, classes):
        """Teacher forcing: codes [B, T'] (T' <= n_tokens), classes [B] -> logits [B, T', codebook]; i predicts code i."""
        cls = self.class_ids(classes)
        if self.training and self.config.class_dropout > 0:
            drop = torch.rand(cls.shape, device=cls.device) < self.config.class_dropout
            cls = torch.where(drop, self.config.null_class, cls)
        return self.logits(torch.cat([cls[:, None], codes[:, :-1]], dim=1))

    # ---------------- KV-cached sampling (Sec. 4, sampling with the power-cosine schedule) ----------------

    def setup_cache(self, batch):
        """Allocate every layer's KV cache for `batch` sequences of 1 + n_tokens positions."""
        for block in self.blocks:
            block.attn.setup_cache(batch, self.config.n_tokens + 1)

    def free_cache(self):
        """Drop every layer's KV cache."""
        for block in self.blocks:
            block.attn.cache = None

    def prefill(self, ids):
        """Run the first tokens [B, T0] into the caches at positions 0..T0-1; logits [B, codebook] of the last."""
        return self.logits(ids, torch.arange(ids.shape[1], device=ids.device), ids.shape[1])[:, -1]

    def decode_one_token(self, ids, pos, length):
        """One new token [B, 1] at cache position pos (a 1-element long tensor), attending over the first
        `length` > pos cache positions -> logits [B, codebook]."""
        return self.logits(ids, pos, length)[:, -1]

    @torch.no_grad()
    def generate(self, classes, cfg_scale=None, cfg_power=None, temperature=1.0, top_k=0, top_p=1.0,
                 generator=None, seeds=None, step=None):
        """Sample codes [B, n_tokens] for class indices [B]: prefill the class token, then one `step` per code
        (default decode_step; speed.compile_step gives it compiled).

        Guidance follows the power-cosine schedule (cfg_schedule): the conditional and unconditional sequences
        run as one doubled batch; scale 1 runs no unconditional half. Randomness: one uniform per sample and
        step, from `seeds` (one int per sample: the result does not depend on batch composition) or else
        from `generator`. temperature 0 means argmax. The KV caches stay allocated for the next call
        (free_cache() releases them). Non-finite logits raise FloatingPointError naming the first such step.
        """
        cfg, device, step = self.config, self.output.weight.device, step or decode_step
        g = cfg.cfg_scale if cfg_scale is None else cfg_scale
        p = cfg.cfg_power if cfg_power is None else cfg_power
        classes = torch.as_tensor(classes).long()
        check_classes(classes.tolist(), cfg.num_classes, allow_null=True)
        B, T, classes = len(classes), cfg.n_tokens, classes.to(device)
        u = sample_uniforms(B, T, generator, seeds).to(device)
        scales = torch.tensor([cfg_schedule(s, T, g, p) for s in range(T)], device=device)
        ids = self.class_ids(classes)[:, None]
        if g != 1.0:                                           # the unconditional half: the null class
            ids = torch.cat([ids, torch.full_like(ids, cfg.null_class)])
        codes = torch.zeros(B, T, dtype=torch.long, device=device)
        finite = torch.ones(T, dtype=torch.bool, device=device)
        positions = torch.arange(T + 1, device=device)
        self.setup_cache(len(ids))
        sampling = (temperature, top_k, top_p)
        codes[:, 0], finite[0] = next_code(self.prefill(ids), scales[0], u[:, 0], *sampling)
        for s in range(1, T):                                  # code s - 1 enters the cache at position s
            token = codes[:, s - 1:s].repeat(len(ids) // B, 1)
            codes[:, s], finite[s] = step(self, token, positions[s:s + 1], s + 1, scales[s], u[:, s], *sampling)
        if not bool(finite.all()):                             # one host sync per call, after the loop
            first = int((~finite).nonzero()[0])
            raise FloatingPointError(f"non-finite logits at sampling step {first} of {T} (guidance scale {g}, power "
                                     f"{p}): the generator's weights or the guidance settings are broken")
        return codes


# ----------------------------------------------------------------------------------------------------
# Sampling (Sec. 4): the power-cosine guidance schedule and multinomial sampling by inverse CDF
# ----------------------------------------------------------------------------------------------------

def cfg_schedule(step, n_steps, scale, power):
    """Guidance scale at step in [0, n_steps): 1 + (scale - 1) * (1 - cos(pi * (step / n_steps) ** power)) / 2."""
    return 1 + (scale - 1) * (1 - math.cos(math.pi * (step / n_steps) ** power)) / 2


def decode_step(generator, ids, pos, length, scale, u, temperature=1.0, top_k=0, top_p=1.0):
    """One sampling step of generate(): the generator's decode_one_token, the guidance blend at `scale` (a 0-d
    tensor) when ids holds the conditional and unconditional halves, then sample_token at uniforms u [B].
    (codes [B], whether all logits are finite)."""
    return next_code(generator.decode_one_token(ids, pos, length), scale, u, temperature, top_k, top_p)


def next_code(logits, scale, u, temperature=1.0, top_k=0, top_p=1.0):
    """The guidance blend uncond + scale * (cond - uncond) of logits [2B, V] (halves: conditional, unconditional;
    [B, V] without guidance), then one code per row at uniforms u [B]; (codes [B], whether all logits are finite)."""
    if len(logits) == 2 * len(u):
        cond, uncond = logits.chunk(2)
        logits = uncond + scale * (cond - uncond)
    return sample_token(logits, u, temperature, top_k, top_p), torch.isfinite(logits).all()


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
    return idx.squeeze(1).clamp_max(logits.shape[-1] - 1)     # u * total can round to the total itself


def check_classes(classes, num_classes, allow_null=False):
    """Raise ValueError unless every class index lies in [0, num_classes) (or is -1, the null class, if allowed)."""
    bad = [c for c in classes if not (0 <= c < num_classes or (allow_null and c == -1))]
    if bad:
        raise ValueError(f"class indices must lie in [0, {num_classes}) for this generator"
                         f"{' (-1 = unconditional)' if allow_null else ''}; got {bad[:8]}")


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
    start_token: bool = False  # stage 1: one learned token before the latents in the decoder
    n_buffer: int = 32        # stage 2: learned buffer tokens before the latents in the decoder
    aux_head: bool = False    # stage-1 head that makes the prefix reconstruct the first patch row
    cluster_codebook: bool = False  # stage 1: the clustering codebook update in training, with its `embed_prob` buffer

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

    @property
    def n_leading(self):
        """Learned tokens the decoder puts before the latents: the start token and the buffer tokens."""
        return int(self.start_token) + self.n_buffer


# Stage settings: stage 1 trains against a causal decoder with one start token, the aux head and the clustering
# codebook update; stage 2 trains a bidirectional decoder with the preset's buffer tokens on the frozen codes, in
# the layout of the released inference file (the original's stage 2 runs without clustering: no `embed_prob`).
STAGES = {
    1: dict(causal=True, start_token=True, n_buffer=0, aux_head=True, cluster_codebook=True),
    2: dict(causal=False, start_token=False, aux_head=False, cluster_codebook=False),
}

TOKENIZER_PRESETS = {
    "alitok": TokenizerConfig(),   # the released ImageNet-256 tokenizer
    "tiny": TokenizerConfig(image_size=32, patch_size=4, enc_width=128, enc_layers=2, enc_heads=4,
                            dec_width=128, dec_layers=2, dec_heads=4, codebook_size=256, codebook_dim=16,
                            n_buffer=4),
}


def tokenizer_config(preset="alitok", stage=2, **overrides):
    """The config of a preset tokenizer at a training stage (1, or 2 = "inference": the released file is stage
    2's), with field overrides."""
    kw = {**STAGES[2 if stage == "inference" else stage], **overrides}
    if kw.get("n_prefix", TOKENIZER_PRESETS[preset].n_prefix) == 0:
        kw["aux_head"] = False          # the "no prefix" ablation has nothing for the aux head to read
    return replace(TOKENIZER_PRESETS[preset], **kw)


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
