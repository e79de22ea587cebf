"""Speed for a built model, applied beside it, never inside it: gpt-fast's quantize.py swaps modules in place and
its generate.py compiles decode_one_token and hands it to the loop; this file does both for AliTok.

    generator = speed.for_inference(checkpoints.load_generator(path), precision="bf16")
    codes = generator.generate(classes, step=speed.compile_step(generator))

- hold_weights: every product of the transformer blocks (both models) runs from weights held in float32 or
  bfloat16, cast once; on a CPU, without autograd, from a copy in oneDNN's blocked layout, which multiplies the
  few rows of a decode step about twice as fast as the plain layout (MKL re-packs it at every call); the
  generator's SwiGLU input products as one, and its output head packed in float32. The residual stream, norms,
  embeddings, output head, logits, guidance and sampling stay float32.
- cpu_caches: on a CPU the generator's KV caches are float32 whatever its weights (a CPU's bfloat16 attention is
  slower than its float32 one) and their one-position writes plain copies (index_copy_ costs about 1.3 ms of a
  B step). The plain model keeps its caches in its weights' dtype.
- compile_step: torch.compile of the whole sampling step (alitok.decode_step: the one-token forward, the guidance
  blend and the sampling), static shapes and no host sync, for generate(step=...); on a GPU every step replays a
  captured CUDA graph.

Each is held equal to the plain model by the tests (cached = full forward, packed = plain products, compiled =
eager codes, the golden greedy generation).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import alitok

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PACK_MIN = 2 ** 18        # smaller weights: MKL multiplies them well as they are


def packing_available():
    """Whether this torch build has oneDNN's packed-weight CPU products."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight):
    """weight [out, in] in oneDNN's blocked layout for products of about 8 rows, or None where this CPU has no
    such kernel for its dtype (bfloat16 needs AVX-512 or AVX-NE-CONVERT)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 8)
    except RuntimeError:
        return None


def packs(module, x):
    """Whether module (packed=True) multiplies x from a packed copy: on a CPU, without autograd, not compiling."""
    return (module.packed and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def packed_copy(module, *weights):
    """module._copy's packed copy of weights (stacked by rows), made again when one changed (an optimiser step);
    None where this CPU has no such kernel."""
    version = tuple((w.data_ptr(), w._version) for w in weights)
    if module._copy is None or module._copy[0] != version:
        module._copy = (version, pack(torch.cat([w.detach() for w in weights])))
    return module._copy[1]


class HeldLinear(nn.Module):
    """An nn.Linear with its weights held in `dtype`: the input is cast to it, the output back to the input's
    dtype. packed: without autograd, on a CPU, multiply from a oneDNN-packed copy, made once per weight version."""

    def __init__(self, linear, dtype, packed):
        super().__init__()
        self.in_features, self.out_features, self.packed = linear.in_features, linear.out_features, packed
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), linear.weight.requires_grad)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype),
                                                                  linear.bias.requires_grad)
        self._copy = None                                  # (weight version, packed copy)

    def forward(self, x):
        w, y = self.weight, x.to(self.weight.dtype)
        if packs(self, x) and w.numel() >= PACK_MIN and packed_copy(self, w) is not None:
            return torch.ops.mkldnn._linear_pointwise(y, self._copy[1], self.bias, "none", [], "").to(x.dtype)
        return F.linear(y, w, self.bias).to(x.dtype)


class StackedSwiGLU(alitok.SwiGLU):
    """alitok.SwiGLU (same parameters, same names) whose two input products run as one on a CPU without autograd:
    w1 and w3 stacked once into a packed copy, so a decode step reads both in one pass."""

    def __init__(self, mlp):
        nn.Module.__init__(self)
        self.w1, self.w3, self.w2, self.ffn_dropout = mlp.w1, mlp.w3, mlp.w2, mlp.ffn_dropout
        self.packed = getattr(mlp.w1, "packed", False)     # as its HeldLinear products
        self._copy = None                                  # (weight versions, packed copy of [w1; w3])

    def forward(self, x):
        w1 = self.w1.weight
        if not (packs(self, x) and packed_copy(self, w1, self.w3.weight) is not None):
            return super().forward(x)
        both = torch.ops.mkldnn._linear_pointwise(x.to(w1.dtype), self._copy[1], None, "none", [], "").to(x.dtype)
        gate, up = both.chunk(2, -1)
        return self.ffn_dropout(self.w2(F.silu(gate) * up))


class CopyCache(alitok.KVCache):
    """alitok.KVCache whose one-position writes on a CPU are plain copies, faster there than index_copy_."""

    def update(self, pos, k, v, length):
        if len(pos) > 1 or torch.compiler.is_compiling():
            return super().update(pos, k, v, length)
        self.k[:, :, int(pos)].copy_(k[:, :, 0])
        self.v[:, :, int(pos)].copy_(v[:, :, 0])
        return self.k[:, :, :length], self.v[:, :, :length]


class CPUCacheAttention(alitok.SelfAttention):
    """alitok.SelfAttention (same parameters, same names) whose KV cache on a CPU is a float32 CopyCache whatever
    the weights' dtype: bfloat16 attention is slower there (B bf16 generate(): 15.8 s with a float32 cache against
    21.7 s with a bfloat16 one on a CPU with AVX-512 BF16 units). Elsewhere the cache is alitok's."""

    def __init__(self, attn):
        nn.Module.__init__(self)
        self.heads, self.head_dim, self.dropout, self.cache = attn.heads, attn.head_dim, attn.dropout, attn.cache
        self.qkv, self.q_norm, self.k_norm, self.proj = attn.qkv, attn.q_norm, attn.k_norm, attn.proj
        self.resid_dropout = attn.resid_dropout

    def setup_cache(self, batch, max_len, dtype=None):
        cpu = self.qkv.weight.device.type == "cpu"
        super().setup_cache(batch, max_len, torch.float32 if cpu else dtype)
        if cpu and type(self.cache) is not CopyCache:
            self.cache = CopyCache(*self.cache.k.shape, self.cache.k.dtype, self.cache.k.device)


def hold_weights(model, dtype=torch.float32, packed=None):
    """Swap every nn.Linear of the transformer blocks (Tokenizer and Generator) for a HeldLinear in dtype, in
    place, the generator's SwiGLU for a StackedSwiGLU and its output head for a float32 HeldLinear; packed
    (default: on a CPU build with oneDNN) as HeldLinear. Returns the model."""
    packed = packing_available() if packed is None else packed
    for block in model.modules():
        if isinstance(block, (alitok.Block, alitok.ARBlock)):
            for parent in list(block.modules()):
                for name, child in parent.named_children():
                    if type(child) is nn.Linear:
                        setattr(parent, name, HeldLinear(child, dtype, packed))
            if isinstance(block, alitok.ARBlock) and type(block.mlp) is alitok.SwiGLU:
                block.mlp = StackedSwiGLU(block.mlp)
    if isinstance(model, alitok.Generator) and type(model.output) is nn.Linear:
        model.output = HeldLinear(model.output, torch.float32, packed)     # the logits stay float32
    return model


def cpu_caches(generator):
    """Swap every SelfAttention of the generator for a CPUCacheAttention, in place. Returns the model."""
    for block in generator.blocks:
        if type(block.attn) is alitok.SelfAttention:
            block.attn = CPUCacheAttention(block.attn)
    return generator


def compile_step(generator, block=None):
    """alitok.decode_step (one-token forward, guidance blend, sampling) compiled with static shapes, as a step for
    the generator's generate(step=...); on a GPU each step replays a captured CUDA graph. Steps attend over the
    whole cache with the mask hiding what is not written yet, or (block) over the filled part rounded up to a
    multiple of block positions: less to read, one graph per shape. Callers pad batches to one size."""
    cuda = generator.output.weight.device.type == "cuda"
    compiled = torch.compile(alitok.decode_step, mode="reduce-overhead" if cuda else None, fullgraph=True,
                             dynamic=False if block is None else None)
    marked = []                                            # the caches whose addresses the graphs may keep

    def step(generator, ids, pos, length, *sampling):
        if cuda and [layer.attn.cache for layer in generator.blocks] != marked:   # graphs write them in place
            marked[:] = [layer.attn.cache for layer in generator.blocks]
            for cache in marked:
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
        full = generator.config.n_tokens + 1
        torch.compiler.cudagraph_mark_step_begin()         # the last step's outputs are used: buffers may be reused
        return compiled(generator, ids, pos, full if block is None else min(-(-length // block) * block, full),
                        *sampling)
    return step


def for_inference(model, precision="fp32"):
    """The one call of sample.py and bench.py: weights held in precision ("fp32" or "bf16"; packed on a CPU) and,
    for a generator, the KV-cache rules of a CPU (cpu_caches). Returns the model, in eval mode, on the device it
    was on; speed.compile_step(model) gives its compiled sampling step."""
    cpu = next(model.parameters()).device.type == "cpu"
    if cpu or precision != "fp32":
        hold_weights(model, DTYPES[precision], packed=cpu and packing_available())
    if isinstance(model, alitok.Generator):
        cpu_caches(model)
    return model.eval()
