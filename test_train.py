import json
import re
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alitok
import train

HERE = Path(__file__).resolve().parent
MANIFESTS = HERE.parent / "shared" / "reference" / "manifests"
TINY = ["--batch-size", "8", "--n-images", "64", "--warmup", "5", "--log-every", "5", "--image-every", "1000",
        "--no-progress"]


def run_main(argv):
    args = train.parse_args(argv)
    train.main(args)
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def fixed_batch(n=16, size=32):
    import data
    ds = data.build_dataset("shapes", size, train=False, split="val", n_images=n)
    return torch.stack([ds[i][0] for i in range(n)]), torch.tensor([ds[i][1] for i in range(n)])


def tokenizer_loss_on(tok, x):
    tok.eval()
    with torch.no_grad():
        out = tok(x)
    return float(alitok.reconstruction_loss(x, out, tok.config.patch_size, tok.config.n_prefix))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 1 -> stage 2 -> generator, a few tiny steps each (shared by the tests below)."""
    root = tmp_path_factory.mktemp("stages")
    s1 = run_main(["--stage", "1", "--out", str(root / "s1"), "--steps", "40", "--lr", "2e-3", *TINY])
    s2 = run_main(["--stage", "2", "--out", str(root / "s2"), "--init", str(root / "s1" / "ckpt.pt"),
                   "--steps", "30", "--lr", "2e-3", *TINY])
    ar = run_main(["--stage", "ar", "--out", str(root / "ar"), "--tokenizer", str(root / "s2" / "tokenizer.pt"),
                   "--steps", "30", "--lr", "3e-3", *TINY])
    return root, s1, s2, ar


def test_stage1_lowers_loss_on_fixed_batch(stages):
    root, s1, _, _ = stages
    torch.manual_seed(s1.seed)
    init = train.stage1_tokenizer(s1)                          # the same initial weights main() built
    trained = alitok.load_tokenizer(root / "s1" / "ckpt.pt")
    x, _ = fixed_batch()
    assert tokenizer_loss_on(trained, x) < 0.8 * tokenizer_loss_on(init, x)
    records = [json.loads(l) for l in open(root / "s1" / "metrics.jsonl")]
    assert records[-1]["step"] == 40 and {"loss", "rec", "vq", "psnr", "codebook_usage", "lr"} <= set(records[-1])
    assert (root / "s1" / "latest.png").exists()


def test_stage2_freezes_encoder_codebook_and_exports_inference_layout(stages):
    root, _, _, _ = stages
    first = torch.load(root / "s1" / "ckpt.pt", weights_only=False)["model"]
    second = torch.load(root / "s2" / "ckpt.pt", weights_only=False)["model"]
    frozen = [k for k in first if k.split(".")[0] in ("encoder", "latent_tokens", "quantize")]
    assert len(frozen) > 10 and all(torch.equal(first[k], second[k]) for k in frozen)
    assert not torch.equal(first["decoder.ln_post.weight"], second["decoder.ln_post.weight"])
    tok = alitok.load_tokenizer(root / "s2" / "tokenizer.pt")
    assert not tok.config.causal and tok.config.n_buffer == 4 and not tok.config.aux_head
    if MANIFESTS.exists():                                     # same names as the released AliTok.pth
        names = {l.split("\t")[0] for l in (MANIFESTS / "tokenizer_inference.txt").read_text().splitlines()
                 if l and not l.startswith("#")}
        layers = lambda keys: {re.sub(r"transformer\.\d+\.", "transformer.N.", k) for k in keys}
        assert layers(tok.state_dict()) == layers(names)
    x, _ = fixed_batch()
    s1_tok = alitok.load_tokenizer(root / "s1" / "ckpt.pt")
    assert torch.equal(tok.encode(x), s1_tok.encode(x))       # the codes do not change in stage 2


def test_generator_stage_lowers_loss_and_writes_checkpoint(stages):
    root, _, _, ar = stages
    codes = np.load(root / "ar" / "codes.npz")
    assert codes["codes"].shape == (64, 10, 73)
    records = [json.loads(l) for l in open(root / "ar" / "metrics.jsonl")]
    assert records[-1]["loss"] < records[0]["loss"] and 0 <= records[-1]["acc"] <= 1
    gen = alitok.load_generator(root / "ar" / "generator.pt")
    assert torch.load(root / "ar" / "generator.pt", weights_only=False)["tokenizer"].endswith("tokenizer.pt")
    c = torch.from_numpy(codes["codes"][:16, 4].astype(np.int64))
    y = torch.from_numpy(codes["labels"][:16])
    with torch.no_grad():                                       # the zero-initialised output layer starts at log K
        loss = float(torch.nn.functional.cross_entropy(gen(c, y).flatten(0, 1), c.flatten()))
    assert loss < math.log(256) - 0.1
    assert (root / "ar" / "latest.png").exists()


def test_resume_after_stop_is_exact(tmp_path, stages):
    """Generator stage (dropout, class dropout, ten-crop picks): stop at step 7, resume, equal at 15."""
    root = stages[0]
    common = ["--stage", "ar", "--tokenizer", str(root / "s2" / "tokenizer.pt"), "--codes",
              str(root / "ar" / "codes.npz"), "--steps", "15", "--ckpt-every", "100", *TINY]
    run_main([*common, "--out", str(tmp_path / "a")])
    run_main([*common, "--out", str(tmp_path / "b"), "--stop-after", "7"])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 7
    run_main([*common, "--out", str(tmp_path / "b"), "--resume"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 15
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
               for i in a["optimizer"]["state"])


def test_resume_after_kill_is_exact(tmp_path):
    """Stage 1 killed for real (SIGKILL) mid-run, then resumed, ends bit for bit like an uninterrupted run."""
    common = [sys.executable, str(HERE / "train.py"), "--stage", "1", "--steps", "60", "--ckpt-every", "2", *TINY]
    subprocess.run([*common, "--out", str(tmp_path / "a")], check=True, env=env1(), capture_output=True)
    proc = subprocess.Popen([*common, "--out", str(tmp_path / "b")], env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "b" / "ckpt.pt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=False)["step"]   # a complete file: writes are atomic
    assert 0 < killed_at < 60
    subprocess.run([*common, "--out", str(tmp_path / "b"), "--resume"], check=True, env=env1(), capture_output=True)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert b["step"] == 60 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_two_processes_match_one_process(tmp_path, stages):
    """torchrun, gloo: 2 x batch 4 ends with the weights of 1 x batch 8 (generator stage, dropout off)."""
    root = stages[0]
    args = ["--stage", "ar", "--tokenizer", str(root / "s2" / "tokenizer.pt"), "--codes",
            str(root / "ar" / "codes.npz"), "--steps", "6", *TINY, "--dropout", "0", "--token-dropout", "0",
            "--class-dropout", "0"]
    subprocess.run([sys.executable, str(HERE / "train.py"), *args, "--out", str(tmp_path / "one")],
                   check=True, env=env1(), capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(HERE / "train.py"), *args, "--out",
                          str(tmp_path / "two")], env=env1(), capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 = 2 x 4" in two.stdout + two.stderr
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _cluster_worker(rank, world, port, z, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    q = _quantizer()
    q.cluster_update_(z.chunk(world)[rank])
    if rank == 0:
        torch.save(q.state_dict(), out)
    torch.distributed.destroy_process_group()


def _quantizer():
    torch.manual_seed(0)
    q = alitok.VectorQuantizer(alitok.tokenizer_config("tiny", 1, codebook_size=64, codebook_dim=8))
    with torch.no_grad():
        q.embedding.weight.normal_()
        q.embed_prob.uniform_(0, 0.002)                       # a mix of used and rarely used codes
    return q


def test_codebook_statistics_gathered_across_processes(tmp_path):
    """The clustering update over 2 gloo processes with half a batch each equals 1 process with all of it."""
    z = torch.randn(2 * 40, 8, generator=torch.Generator().manual_seed(1))
    torch.multiprocessing.spawn(_cluster_worker, args=(2, free_port(), z, tmp_path / "two.pt"), nprocs=2)
    one = _quantizer()
    one.cluster_update_(z)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    torch.testing.assert_close(two["embed_prob"], one.embed_prob)
    torch.testing.assert_close(two["embedding.weight"], one.embedding.weight)
    assert not torch.equal(one.embedding.weight, _quantizer().embedding.weight)   # the update did move codes


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    real = train.tokenizer_loss

    def poisoned(args, cfg, out, x, step, nets):
        loss, parts = real(args, cfg, out, x, step, nets)
        return (loss * float("nan"), parts) if step >= 5 else (loss, parts)

    monkeypatch.setattr(train, "tokenizer_loss", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite loss at step 5"):
        run_main(["--stage", "1", "--out", str(tmp_path), "--steps", "10", "--ckpt-every", "2", *TINY])
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_folder_with_corrupt_image_trains_and_reports(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    (tmp_path / "data" / "b" / "broken.jpg").write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match="broken.jpg"):
        run_main(["--stage", "1", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data"),
                  "--steps", "2", "--batch-size", "4", "--no-progress", "--warmup", "1", "--max-bad-fraction", "0.1"])
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 2


def test_ablation_switches_build_the_paper_baselines():
    build = lambda *a: train.stage1_tokenizer(train.parse_args(["--stage", "1", *a])).config
    assert build().causal and build().aux_head and build().n_prefix == 9
    assert not build("--decoder", "bidirectional").causal
    assert build("--no-prefix").n_prefix == 0 and not build("--no-prefix").aux_head
    assert not build("--no-aux").aux_head and build("--no-aux").n_prefix == 9


def test_lr_schedule_and_data_order():
    assert train.lr_at(0, 1.0, 10, 100, 0.0) == pytest.approx(0.1)
    assert train.lr_at(9, 1.0, 10, 100, 0.0) == pytest.approx(1.0)
    assert train.lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    steps = [train.global_batch_indices(20, 8, 0, s) for s in range(4)]
    assert torch.equal(torch.cat(steps[:2]).sort().values.unique(), torch.cat(steps[:2]).sort().values)
    assert not torch.equal(steps[0], steps[2])                   # a new permutation each epoch
    shares = [list(train.StepBatches(20, 8, 0, 0, 1, r, 2))[0] for r in range(2)]
    assert shares[0] + shares[1] == steps[0].tolist()
