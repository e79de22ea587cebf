"""Tests for alitok: run with `make test` (CPU, tiny configs); full-size checks are marked slow."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import alitok
from alitok import (ARConfig, Generator, Tokenizer, cfg_schedule, checkpoint, generator_config, load_generator,
                    load_tokenizer, rotary_table, sample_token, tokenizer_config)

SHARED = Path(__file__).resolve().parent.parent / "shared" / "reference"
MANIFESTS, GOLDEN = SHARED / "manifests", SHARED / "golden"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference not present beside the checkout")
torch.set_num_threads(min(2, torch.get_num_threads()))


def read_manifest(name):
    """{tensor name: shape} from a manifest file (the last line is a count)."""
    out = {}
    for line in (MANIFESTS / name).read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    return out


def golden(name):
    """A golden npz and the recipe module that made it."""
    sys.path.insert(0, str(GOLDEN))
    import recipe
    return np.load(GOLDEN / name), recipe


def tiny_tokenizer(stage=1, **kw):
    torch.manual_seed(0)
    return Tokenizer(tokenizer_config("tiny", stage, **kw)).eval()


def tiny_generator(**kw):
    torch.manual_seed(0)
    gen = Generator(generator_config("tiny", **kw)).eval()
    torch.nn.init.normal_(gen.output.weight, std=0.5)       # zero at init: randomise so logits differ
    return gen


# ---------------------------------------------------------------------------------------------------
# Released layouts
# ---------------------------------------------------------------------------------------------------

LAYOUTS = [("tokenizer_inference.txt", lambda: Tokenizer(tokenizer_config("alitok", "inference"))),
           ("tokenizer_stage1.txt", lambda: Tokenizer(tokenizer_config("alitok", 1))),
           ("tokenizer_stage2.txt", lambda: Tokenizer(tokenizer_config("alitok", 2))),
           ("ar_b.txt", lambda: Generator(generator_config("B"))),
           ("ar_l.txt", lambda: Generator(generator_config("L"))),
           ("ar_xl.txt", lambda: Generator(generator_config("XL")))]


@needs_shared
@pytest.mark.parametrize("manifest,build", LAYOUTS, ids=[m for m, _ in LAYOUTS])
def test_state_dict_matches_manifest(manifest, build):
    with torch.device("meta"):
        model = build()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = read_manifest(manifest)
    assert sorted(set(got) ^ set(want)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


@needs_shared
@pytest.mark.parametrize("manifest,build", LAYOUTS, ids=[m for m, _ in LAYOUTS])
def test_config_inferred_from_released_shapes(manifest, build):
    """load_* rebuild the right config from a bare released state dict (shapes only, meta tensors)."""
    with torch.device("meta"):
        model = build()
        state = model.state_dict()
    if manifest.startswith("ar_"):
        cfg = alitok.infer_generator_config(state)
    else:
        cfg = alitok.infer_tokenizer_config(state)
        cfg = replace(cfg, enc_heads=model.config.enc_heads, dec_heads=model.config.dec_heads)
    assert cfg == model.config


def test_checkpoint_round_trip_is_strict_and_exact(tmp_path):
    tok, gen = tiny_tokenizer(1), tiny_generator()
    torch.save(checkpoint(tok), tmp_path / "tok.pt")
    torch.save(checkpoint(gen), tmp_path / "gen.pt")
    tok2, gen2 = load_tokenizer(tmp_path / "tok.pt"), load_generator(tmp_path / "gen.pt")
    assert tok2.config == tok.config and gen2.config == gen.config
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(tok2(x)["recon"], tok(x)["recon"])
    codes = torch.randint(0, 256, (2, 73))
    assert torch.equal(gen2(codes, torch.tensor([1, 2])), gen(codes, torch.tensor([1, 2])))
    # A bare state dict (as the released files are) also loads, with its config inferred from shapes.
    tok3 = load_tokenizer(tok.state_dict())
    assert tok3.config.n_prefix == 9 and tok3.config.aux_head and tok3.config.track_usage


def test_mismatched_checkpoint_names_tensors_and_fitting_config():
    small = tiny_tokenizer("inference").state_dict()
    wrong = Tokenizer(tokenizer_config("tiny", "inference", dec_width=64))
    with pytest.raises(ValueError) as e:
        alitok.load_strict(wrong, small, fits=alitok.infer_tokenizer_config(small))
    msg = str(e.value)
    assert "mis-shaped" in msg and "decoder.decoder_embed.weight" in msg and "dec_width=128" in msg
    state = dict(small)
    state.pop("decoder.ln_post.bias")
    state["decoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing: decoder\.ln_post\.bias(.|\n)*unexpected: decoder\.extra"):
        load_tokenizer(state)
    with pytest.raises(ValueError, match="not a tokenizer checkpoint"):
        load_tokenizer(tiny_generator().state_dict())


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

def test_encode_decode_api():
    tok = tiny_tokenizer("inference")
    x = torch.rand(3, 3, 32, 32)
    codes = tok.encode(x)
    assert codes.dtype == torch.int64 and codes.shape == (3, 73) and 0 <= codes.min() and codes.max() < 256
    img = tok.decode(codes)
    assert img.shape == (3, 3, 32, 32) and 0 <= img.min() and img.max() <= 1
    out = tok(x)
    assert out["aux"] is None and torch.equal(out["codes"], codes) and out["vq_loss"].ndim == 0


def test_stage1_decoder_is_causal():
    """Changing code j changes no output computed from latent positions before j."""
    tok = tiny_tokenizer(1)
    cfg = tok.config
    codes = torch.randint(0, cfg.codebook_size, (1, cfg.n_tokens))
    base_img, base_aux = tok.decoder(tok.quantize.embedding(codes))
    P = cfg.patch_size
    for j in (3, cfg.n_prefix + 10, cfg.n_tokens - 1):
        changed = codes.clone()
        changed[0, j] = (changed[0, j] + 1) % cfg.codebook_size
        img, aux = tok.decoder(tok.quantize.embedding(changed))
        before = (img - base_img).abs().view(1, 3, cfg.grid, P, cfg.grid, P).amax(dim=(1, 3, 5)).flatten()
        first_seen = max(j - cfg.n_prefix, 0)             # image patch p reads latent n_prefix + p
        assert before[:first_seen].sum() == 0 and before[first_seen] > 0
        strip = (aux - base_aux).abs().view(1, 3, P, cfg.n_prefix, P).amax(dim=(1, 2, 4)).flatten()
        assert strip[:min(j, cfg.n_prefix)].sum() == 0


def test_stage2_decoder_is_bidirectional():
    tok = tiny_tokenizer(2)
    codes = torch.randint(0, 256, (1, 73))
    changed = codes.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    a, b = tok.decode(codes), tok.decode(changed)
    assert (a[..., :4, :4] - b[..., :4, :4]).abs().max() > 0     # the first patch sees the last code


def test_aux_target_layout():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    t = alitok.aux_target(x, 4)
    assert t.shape == (2, 3, 4, 36)
    assert torch.equal(t[..., :4], x[:, :, :4, :4]) and torch.equal(t[..., 4:], x[:, :, :4, :])


def test_straight_through_gradient_reaches_encoder():
    tok = tiny_tokenizer(1).train()
    out = tok(torch.rand(2, 3, 32, 32))
    alitok.reconstruction_loss(torch.rand(2, 3, 32, 32), out, 4, 9).backward()
    assert tok.encoder.patch_embed.weight.grad.abs().sum() > 0
    assert tok.latent_tokens.grad.abs().sum() > 0


def test_clustering_update_moves_unused_code_and_keeps_used_one():
    cfg = tokenizer_config("tiny", 1, codebook_size=8, codebook_dim=4)
    q = alitok.VectorQuantizer(cfg)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(8, 4) * 3)
        q.embed_prob[0] = 0.5                                  # code 0 is heavily used
    z = torch.tensor([3.0, 0, 0, 0]) + 0.01 * torch.randn(50, 4)  # every vector lands on code 0
    before = q.embedding.weight.clone()
    q.cluster_update_(z)
    after = q.embedding.weight
    assert torch.equal(after[0], before[0])
    d5 = ((z - before[5]) ** 2).sum(1)                         # unused code 5 moves onto its nearest vector
    assert torch.allclose(after[5], z[d5.argmin()], atol=1e-2)
    assert q.embed_prob[0] == pytest.approx(0.99 * 0.5 + 0.01)


@needs_shared
def test_golden_released_tokenizer():
    g, recipe = golden("tokenizer.npz")
    tok = recipe.fill_(Tokenizer(tokenizer_config("alitok", "inference"))).eval()
    inp = recipe.inputs()
    assert np.array_equal(tok.encode(inp["images"]).numpy(), g["codes_of_images"])
    np.testing.assert_allclose(tok.decode(inp["codes"]).numpy(), g["decode_of_codes"], rtol=1e-4, atol=2e-5)


@needs_shared
def test_golden_stage1_tokenizer():
    g, recipe = golden("tokenizer_stage1.npz")
    tok = recipe.fill_(Tokenizer(tokenizer_config("alitok", 1))).eval()
    with torch.no_grad():
        out = tok(recipe.inputs()["images"])
    assert np.array_equal(out["codes"].numpy(), g["codes_of_images"])
    np.testing.assert_allclose(out["recon"].numpy(), g["recon"], rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(out["aux"].numpy(), g["aux"], rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------

def test_ffn_hidden_and_vocabulary():
    assert [alitok.ffn_hidden(w) for w in (768, 1024, 1280)] == [2048, 2816, 3584]
    cfg = generator_config("B")
    assert cfg.vocab_size == 5098 and cfg.null_class == 5097 and cfg.n_tokens == 273
    gen = tiny_generator()
    assert gen.class_ids(torch.tensor([0, 9, -1])).tolist() == [257, 266, 267]


def test_rotary_table_layout():
    cfg = ARConfig(width=64, heads=2, n_prefix=5, grid=4)         # head_dim 32: 16 pairs, 8 per axis
    t = rotary_table(cfg)
    assert t.shape == (1 + 5 + 16, 16, 2)
    assert t[0].abs().max() == 0                                   # the class token: cos = sin = 0
    f1 = 10000.0 ** (-torch.arange(16).float() * 2 / 32)
    for p in range(5):                                             # prefix: 1-D positions 0..4
        assert torch.allclose(t[1 + p, :, 0], torch.cos(p * f1), atol=1e-6)
        assert torch.allclose(t[1 + p, :, 1], torch.sin(p * f1), atol=1e-6)
    f2 = 10000.0 ** (-torch.arange(8).float() * 2 / 16)
    for row, col in [(0, 0), (1, 2), (3, 3)]:                      # grid: row then column, offset by 5
        r = t[1 + 5 + row * 4 + col]
        assert torch.allclose(r[:8, 1], torch.sin((5 + row) * f2), atol=1e-6)
        assert torch.allclose(r[8:, 1], torch.sin((5 + col) * f2), atol=1e-6)
        assert torch.allclose(r[8:, 0], torch.cos((5 + col) * f2), atol=1e-6)


def test_cfg_schedule_rises_from_one_to_scale():
    s = [cfg_schedule(i, 273, 16.0, 1.8) for i in range(273)]
    assert s[0] == 1.0 and all(a <= b for a, b in zip(s, s[1:])) and 15.9 < s[-1] < 16.0
    assert cfg_schedule(100, 200, 5.0, 1.0) == pytest.approx(3.0)


def test_out_of_range_classes_raise():
    gen = tiny_generator()
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 10\)"):
        gen(torch.zeros(1, 73, dtype=torch.long), torch.tensor([10]))
    with pytest.raises(ValueError, match="got"):
        gen.generate(torch.tensor([3, -5]), cfg_scale=1.0)


@pytest.mark.parametrize("shape", ["tiny", "B-width"])
def test_cached_logits_equal_full_forward(shape):
    """prefill + decode_one_token give the full forward's logits at every position, CFG batch included."""
    kw = {} if shape == "tiny" else dict(width=768, heads=16, layers=2, n_prefix=5, grid=4, codebook_size=512)
    gen = tiny_generator(**kw)
    T = gen.config.n_tokens
    classes = torch.tensor([1, 2, 3])
    codes = torch.randint(0, gen.config.codebook_size, (3, T))
    ids = torch.cat([gen.class_ids(classes)[:, None], codes[:, :-1]], 1)
    ids = torch.cat([ids, ids.clone().index_fill_(1, torch.tensor([0]), gen.config.null_class)])  # CFG pair
    with torch.no_grad():
        full = gen.run(ids)
        gen.setup_cache(ids.shape[0])
        steps = [gen.prefill(ids[:, :1])]
        steps += [gen.decode_one_token(ids[:, s:s + 1], torch.tensor([s])) for s in range(1, T)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)


def test_generate_same_codes_with_and_without_cache():
    gen = tiny_generator()
    kw = dict(cfg_scale=3.0, cfg_power=1.0, seeds=[5, 6])
    a = gen.generate(torch.tensor([1, 7]), **kw)
    b = gen.generate(torch.tensor([1, 7]), use_cache=False, **kw)
    assert torch.equal(a, b) and a.shape == (2, 73)
    c = gen.generate(torch.tensor([1, 7]), generator=torch.Generator().manual_seed(0), cfg_scale=3.0)
    d = gen.generate(torch.tensor([1, 7]), generator=torch.Generator().manual_seed(0), cfg_scale=3.0)
    assert torch.equal(c, d)


def test_per_sample_seeds_do_not_depend_on_batch():
    gen = tiny_generator()
    both = gen.generate(torch.tensor([1, 7]), cfg_scale=2.0, seeds=[11, 12])
    alone = gen.generate(torch.tensor([7]), cfg_scale=2.0, seeds=[12])
    assert torch.equal(both[1:], alone)


def test_cfg_scale_one_equals_conditional_sampling():
    """Scale 1 runs no unconditional half and equals sampling from the conditional logits alone."""
    gen = tiny_generator()
    classes, seeds = torch.tensor([2, 4]), [1, 2]
    got = gen.generate(classes, cfg_scale=1.0, seeds=seeds)
    u = alitok.sample_uniforms(2, 73, seeds=seeds)
    codes = torch.zeros(2, 0, dtype=torch.long)
    with torch.no_grad():
        for s in range(73):
            logits = gen(torch.cat([codes, codes[:, :1]], 1), classes)[:, -1]   # the extra code is never seen
            codes = torch.cat([codes, sample_token(logits, u[:, s])[:, None]], 1)
    assert torch.equal(got, codes)


def test_top_k_one_equals_argmax():
    gen = tiny_generator()
    greedy = gen.generate(torch.tensor([0, 5, 9]), cfg_scale=2.0, temperature=0)
    top1 = gen.generate(torch.tensor([0, 5, 9]), cfg_scale=2.0, top_k=1, seeds=[1, 2, 3])
    assert torch.equal(greedy, top1)


def test_sample_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    us = torch.linspace(0, 0.999, 200)
    draw = lambda **kw: {int(sample_token(logits, u.view(1), **kw)) for u in us}
    assert draw() == {0, 1, 2, 3}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.7) == {0, 1}                               # 0.5 + 0.3 covers 0.7
    assert draw(top_p=0.1) == {0}                                  # at least the most likely code stays
    counts = torch.bincount(sample_token(logits.expand(20000, 4), torch.rand(20000)), minlength=4) / 20000
    assert torch.allclose(counts, logits.exp()[0], atol=0.02)      # inverse-CDF draws are multinomial


@needs_shared
def test_golden_generator_b():
    g, recipe = golden("generator_b.npz")
    gen = recipe.fill_(Generator(generator_config("B"))).eval()
    inp = recipe.inputs()
    np.testing.assert_allclose(gen.rope.numpy(), g["rotary_table"], atol=2e-6)
    with torch.no_grad():
        logits = gen(inp["ar_codes"], inp["ar_classes"])[:, g["positions"]]
    np.testing.assert_allclose(logits.numpy(), g["logits_at_positions"], rtol=1e-4, atol=2e-5)
    sched = [cfg_schedule(s, 273, float(g["guidance_scale"]), float(g["guidance_power"])) for s in range(273)]
    np.testing.assert_allclose(sched, g["cfg_scale_per_step"], rtol=1e-12)
    codes = gen.generate(inp["gen_classes"], float(g["guidance_scale"]), float(g["guidance_power"]), temperature=0)
    assert np.array_equal(codes.numpy(), g["greedy_cfg_codes"])


@pytest.mark.slow
def test_released_sizes_round_trip(tmp_path):
    """Full-size models save and load back strictly through load_tokenizer / load_generator."""
    tok = Tokenizer(tokenizer_config("alitok", "inference"))
    torch.save(tok.state_dict(), tmp_path / "AliTok.pth")
    assert load_tokenizer(tmp_path / "AliTok.pth").config == tok.config
    gen = Generator(generator_config("B"))
    torch.save(gen.state_dict(), tmp_path / "alitok_b.bin")
    assert load_generator(tmp_path / "alitok_b.bin").config == gen.config
    assert math.isclose(sum(p.numel() for p in gen.parameters()) / 1e6, 177.0, abs_tol=0.1)
