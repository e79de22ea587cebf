"""Tests of sample.py on tiny random models: seeds vs batching and torchrun, the ADM npz, resuming, guidance
settings, error messages, the grid and the bench. Run with OMP_NUM_THREADS=1; about 20 s on two CPU cores."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample as S
from alitok import Generator, Tokenizer, checkpoint, generator_config, sample_token, sample_uniforms, tokenizer_config

HERE = os.path.dirname(os.path.abspath(__file__))
OPTS = dict(cfg_scale=3.0, cfg_power=1.0, temperature=1.0, top_k=0, top_p=1.0)  # the tiny preset's guidance


def tiny_models(seed=0):
    """(generator, tokenizer): the tiny presets with random weights, eval mode."""
    torch.manual_seed(seed)
    tokenizer = Tokenizer(tokenizer_config("tiny", "inference")).eval()
    generator = Generator(generator_config("tiny", tokenizer=tokenizer.config)).eval()
    torch.nn.init.normal_(generator.output.weight, std=0.5)  # zero at init, which would make sampling uniform
    return generator, tokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def npz_args(ckpts, out, n=20, batch_size=3, *extra):
    return ["--ckpt", ckpts["gen"], "--npz", str(n), "--batch-size", str(batch_size), "--out", str(out),
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def models():
    return tiny_models()


@pytest.fixture(scope="module")
def ckpts(models, tmp_path_factory):
    """Checkpoint files: gen (carries the tokenizer's path, as train.py writes it), bare (does not), tok."""
    folder = tmp_path_factory.mktemp("ckpts")
    generator, tokenizer = models
    paths = {name: str(folder / f"{name}.pt") for name in ("gen", "bare", "tok")}
    torch.save(checkpoint(tokenizer), paths["tok"])
    torch.save(dict(checkpoint(generator), tokenizer=paths["tok"]), paths["gen"])
    torch.save(checkpoint(generator), paths["bare"])
    return paths


@pytest.fixture(scope="module")
def npz_one(ckpts, tmp_path_factory):
    """A 20-sample npz made by one process at batch size 3."""
    out = tmp_path_factory.mktemp("npz") / "one.npz"
    S.main(npz_args(ckpts, out))
    return out


# ----------------------------------------------------------------------------------------------------
# Seeds: a sample does not depend on the batch it is in, nor on the number of processes
# ----------------------------------------------------------------------------------------------------

def test_same_seed_same_samples_at_batch_1_and_4(models):
    generator, tokenizer = models
    one = S.sample_grid(generator, tokenizer, [0, 3, 7], 2, OPTS, seed=5, batch_size=1)
    four = S.sample_grid(generator, tokenizer, [0, 3, 7], 2, OPTS, seed=5, batch_size=4)
    assert torch.equal(one[0], four[0])                     # the same codes; decoding at another batch size
    torch.testing.assert_close(one[1], four[1], rtol=0, atol=1e-5)   # may round differently across threads
    other = S.sample_grid(generator, tokenizer, [0, 3, 7], 2, OPTS, seed=6, batch_size=4)
    assert (other[0] != four[0]).float().mean() > 0.5


def test_npz_two_processes_match_one(ckpts, npz_one, tmp_path):
    out = tmp_path / "two.npz"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(HERE, "sample.py"), *npz_args(ckpts, out, 20, 4)]
    run = subprocess.run(cmd, cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    with np.load(npz_one) as a, np.load(out) as b:
        assert all(np.array_equal(a[k], b[k]) for k in ("arr_0", "arr_1", "codes"))
    assert out.read_bytes() == npz_one.read_bytes()  # fixed zip timestamps: the very same file


# ----------------------------------------------------------------------------------------------------
# The ADM sample batch: layout, balance, order, resuming
# ----------------------------------------------------------------------------------------------------

def test_npz_adm_layout_balanced_and_not_sorted(npz_one):
    with np.load(npz_one) as f:
        images, labels, codes = f["arr_0"], f["arr_1"], f["codes"]
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 3)  # NHWC, 3 channels
    assert labels.dtype == np.int64 and np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert np.any(np.diff(labels) < 0), "samples must not be sorted by class (ADM's IS reads 5k chunks in order)"
    assert np.array_equal(labels, S.balanced_labels(20, range(10), 0))
    assert codes.shape == (20, 73) and images.std() > 0
    assert not os.path.exists(f"{npz_one}.parts"), "the shard folder is removed once the file is written"
    result = json.loads(npz_one.with_suffix(".json").read_text())
    assert result["images_made"] == 20 and result["settings"]["n"] == 20


def test_finished_npz_is_kept_or_redone(ckpts, npz_one, tmp_path, capsys):
    out = tmp_path / "copy.npz"
    out.write_bytes(npz_one.read_bytes())
    (tmp_path / "copy.json").write_bytes(npz_one.with_suffix(".json").read_bytes())
    result = S.main(npz_args(ckpts, out))  # the same line again: nothing to do
    assert "nothing to do" in capsys.readouterr().out and result["images_made"] == 20
    S.main(npz_args(ckpts, out, 20, 3, "--seed", "1"))  # other settings: sampled again
    with np.load(out) as f:
        assert not np.array_equal(f["arr_1"], S.balanced_labels(20, range(10), 0))


def test_balanced_labels_and_cover():
    labels = S.balanced_labels(23, [2, 5, 9], seed=1)
    assert sorted(np.bincount(labels)[[2, 5, 9]].tolist()) == [7, 8, 8]
    shards = [(0, 3, "a"), (0, 6, "b"), (6, 9, "c")]
    assert S.cover(0, 9, shards) == [("b", 0, 6), ("c", 0, 3)]
    assert S.cover(4, 8, shards) == [("b", 4, 6), ("c", 0, 2)]
    assert S.cover(5, 10, shards) is None


def test_npz_resumes_after_a_crash(ckpts, npz_one, tmp_path, monkeypatch, capsys):
    out, real, calls = tmp_path / "resumed.npz", S.generate_batch, []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job dies while making its third batch
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "generate_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        S.main(npz_args(ckpts, out, 20, 3))
    assert not out.exists() and [s[:2] for s in S.list_shards(f"{out}.parts")] == [(0, 3), (3, 6)]
    with pytest.raises(SystemExit):  # shards of another seed must not be mixed in
        S.main(npz_args(ckpts, out, 20, 3, "--seed", "1"))
    assert "another run" in capsys.readouterr().err
    monkeypatch.setattr(S, "generate_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    calls.clear()
    S.main(npz_args(ckpts, out, 20, 6))  # resumed at another batch size: [0, 6) is already there
    assert len(calls) == 3 and out.read_bytes() == npz_one.read_bytes()


# ----------------------------------------------------------------------------------------------------
# Guidance and sampling settings
# ----------------------------------------------------------------------------------------------------

def test_cfg_scale_one_is_conditional_sampling(models):
    generator, tokenizer = models
    classes, seed = [1, 4, 8], 3
    codes, _ = S.sample_grid(generator, tokenizer, classes, 2, dict(OPTS, cfg_scale=1.0), seed=seed, batch_size=4)
    # Conditional-only sampling by teacher forcing: the conditional logits of the sampled sequence, drawn with
    # each sample's own uniforms, reproduce every code.
    labels = torch.tensor([c for c in classes for _ in range(2)])
    with torch.no_grad():
        logits = generator(codes, labels)
    u = sample_uniforms(len(labels), codes.shape[1], seeds=S.sample_seeds(seed, range(len(labels))))
    redrawn = torch.stack([sample_token(logits[:, s], u[:, s]) for s in range(codes.shape[1])], dim=1)
    assert torch.equal(redrawn, codes)
    guided, _ = S.sample_grid(generator, tokenizer, classes, 2, OPTS, seed=seed, batch_size=4)
    assert not torch.equal(guided, codes)


def test_top_k_one_is_greedy(models):
    generator, tokenizer = models
    top1, _ = S.sample_grid(generator, tokenizer, [2, 6], 2, dict(OPTS, top_k=1), seed=0, batch_size=4)
    greedy, _ = S.sample_grid(generator, tokenizer, [2, 6], 2, dict(OPTS, temperature=0.0), seed=9, batch_size=4)
    assert torch.equal(top1, greedy)


def test_bf16_autocast_samples(models):
    generator, tokenizer = models
    codes, images = S.sample_grid(generator, tokenizer, [0, 1], 2, OPTS, batch_size=4, precision="bf16")
    assert codes.shape == (4, 73) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1


# ----------------------------------------------------------------------------------------------------
# Command line: errors, the default grid, the bench
# ----------------------------------------------------------------------------------------------------

def test_out_of_range_class_is_refused(ckpts, tmp_path, capsys):
    for extra in ([], ["--npz", "4"]):
        out = tmp_path / ("x.npz" if extra else "x.png")
        with pytest.raises(SystemExit) as e:
            S.main(["--ckpt", ckpts["gen"], "--classes", "1", "10", "--out", str(out), *extra])
        assert e.value.code == 2 and "[0, 10)" in capsys.readouterr().err and not out.exists()


def test_missing_files_are_explained(ckpts, tmp_path, capsys):
    cases = [(["--ckpt", str(tmp_path / "alitok_b.bin")], ["alitok_b.bin", "AliTok release", "--bench"]),
             (["--ckpt", ckpts["bare"]], ["no tokenizer", "--tokenizer", "AliTok.pth"]),
             (["--ckpt", ckpts["gen"], "--tokenizer", str(tmp_path / "AliTok.pth")], ["tokenizer not found"]),
             ([], ["--ckpt GEN is required"])]
    for argv, words in cases:
        with pytest.raises(SystemExit):
            S.main([*argv, "--out", str(tmp_path / "g.png")])
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    assert not (tmp_path / "g.png").exists()


def test_grid_png_and_settings_json(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    S.main(["--ckpt", ckpts["gen"], "--per-class", "2", "--batch-size", "8", "--out", str(out), "--device", "cpu"])
    assert Image.open(out).size == (2 * 34 + 2, 10 * 34 + 2)  # one row per class (all 10), 2 px padding
    result = json.loads((tmp_path / "grid.json").read_text())
    settings = result["settings"]
    assert settings["classes"] == list(range(10)) and settings["per_class"] == 2 and settings["seed"] == 0
    assert (settings["cfg_scale"], settings["cfg_power"]) == (3.0, 1.0)  # the checkpoint config's values
    assert settings["tokenizer"] == os.path.abspath(ckpts["tok"])  # the path the checkpoint carries
    assert result["images_made"] == 20 and result["images_per_s"] > 0 and result["tokens_per_s"] > 0


def test_bench_drives_the_real_generation(models):
    generator, _ = models
    classes = torch.tensor([0, 5])
    reference = generator.generate(classes, generator=torch.Generator().manual_seed(0))
    for use_cache in (True, False):
        first = generator.generate(classes, generator=torch.Generator().manual_seed(0), use_cache=use_cache,
                                   max_tokens=7)
        assert torch.equal(first, reference[:, :7])
    linear = sum(m.weight.numel() for m in generator.modules() if isinstance(m, torch.nn.Linear))
    assert S.matmul_weights(generator.config) == linear


def test_bench_runs_and_prints_a_table(capsys):
    result = S.main(["--bench", "--bench-preset", "tiny", "--bench-tokens", "6", "--bench-batch", "2",
                     "--device", "cpu"])
    out = capsys.readouterr().out
    assert result["n_tokens"] == 6 and set(result["rows"]) == {"uncached", "cached", "floor", "memory floor"}
    assert all(w in out for w in ("cached (KV cache)", "floor", "K = 6 of 73", ">= 20x", "<= 2x", "decode"))
