"""The FID Inception network: the 2015-12-05 TensorFlow graph that OpenAI's ADM evaluator and pytorch-fid
score with, in torchvision's module names (pytorch-fid's port), loaded from pytorch-fid's weight file, and the
preprocessing of each scoring mode (reference/EVALUATOR_SPEC.md). fid.py computes the metrics from its outputs;
the tokenizer stages use it for the held-out rFID.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import weights

MODES = ("adm", "pytorch-fid")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --precision

# === The FID Inception network: the 2015-12-05 TF graph in torchvision's names (pytorch-fid's port) ===


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU; eps 1e-3 is the TF graph's, not torch's default 1e-5."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    # TF's SAME average pooling divides by the number of real pixels: count_include_pad=False.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b..5d (35x35): 1x1, 5x5, double 3x3 and average-pool branches."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x),
                          self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17 reduction (unchanged from torchvision)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    """Mixed_6b..6e (17x17): 1x1, factorised 7x7, double factorised 7x7 and average-pool branches."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x),
                          self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                          dbl,
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8 reduction (unchanged from torchvision)."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """Mixed_7b / 7c (8x8): split 1x3 + 3x1 branches; the TF graph pools by average in 7b, by max in 7c."""

    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" or "max"
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = _avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                          self.branch_pool(pooled)], 1)


def spatial_features(mixed_6d):
    """Mixed_6d output [N, 768, 17, 17] -> sFID features [N, 2023]: channels 0..6, flattened (h, w, c), c fastest."""
    # torch.cat puts branch1x1 first, so channels 0..6 are its ReLU output (TF's `mixed_6/conv`). TF is NHWC:
    # the reference mu_s was flattened with c fastest, index (h * 17 + w) * 7 + c.
    return mixed_6d[:, :7].permute(0, 2, 3, 1).flatten(1)


class FIDInception(nn.Module):
    """Inception-v3 of the FID: normalised images [N, 3, 299, 299] in [-1, 1] -> pool3, spatial, logits."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # 1008 TF classes (1000 + unused); only its weight is used, for IS

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        x = self.Mixed_6d(x)  # N, 768, 17, 17
        spatial = spatial_features(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(x))))
        pool3 = x.mean((2, 3))  # N, 2048
        # ADM's IS graph multiplies pool3 by the softmax weight matrix alone: no bias.
        return {"pool3": pool3, "spatial": spatial, "logits": pool3 @ self.fc.weight.T}


def fold_batchnorm(model, precision="fp32", device="cpu"):
    """The network in inference form, in place: each BatchNorm folded into its conv's weight and bias (the same
    function up to float rounding, one pass over memory fewer), in `precision` (fp32 | bf16), on `device`."""
    model.eval()
    for m in model.modules():
        if isinstance(m, BasicConv2d) and isinstance(m.bn, nn.BatchNorm2d):
            with torch.no_grad():  # bn(conv(x)) = scale * conv(x) + shift, per output channel
                scale = m.bn.weight * (m.bn.running_var + m.bn.eps).rsqrt()
                m.conv.weight.mul_(scale[:, None, None, None])
                m.conv.bias = nn.Parameter(m.bn.bias - m.bn.running_mean * scale)
            m.bn = nn.Identity()
    # The weights' layout decides every activation's. oneDNN (CPU) runs NHWC fastest; cuDNN runs float32
    # without TF32 faster on NCHW (on an H200 NHWC took 1.2x as long even with BatchNorm folded), bf16 on NHWC.
    nhwc = torch.device(device).type == "cpu" or precision == "bf16"
    layout = torch.channels_last if nhwc else torch.contiguous_format
    return model.to(device, DTYPES[precision], memory_format=layout)  # folded in float32, then cast


def load_inception(path=None, offline=False, precision="fp32", device="cpu"):
    """The FID Inception in inference form (fold_batchnorm) from a pytorch-fid weight file: `path`, or the
    standard file from the torch hub cache, downloaded on first use (weights.standard_weights)."""
    path = weights.standard_weights(weights.INCEPTION_WEIGHTS, path, offline)
    state = checkpoints.read_checkpoint(path, f"FID Inception weights ({weights.INCEPTION_WEIGHTS})")
    with torch.device("meta"):  # no random init: every tensor comes from the file
        model = FIDInception()
    if isinstance(state, dict):  # pytorch-fid's file has no BatchNorm step counters (training bookkeeping)
        counters = {k: torch.zeros((), dtype=torch.long) for k in model.state_dict() if "num_batches" in k}
        state = {**counters, **state}
    checkpoints.load_strict(model, state, source=f"{path} (FID Inception weights, {weights.INCEPTION_WEIGHTS})", assign=True)
    return fold_batchnorm(model, precision, device)


def available_inception(path=None, device="cpu"):
    """(FID Inception, None) from `path` or the cached standard file, never downloading; (None, why) when no
    path is given and the cache lacks it (an explicit path that is missing raises)."""
    try:
        return load_inception(path, offline=True, device=device), None
    except FileNotFoundError:
        if path is not None:
            raise
        return None, (f"no {weights.INCEPTION_WEIGHTS} in {weights.weights_cache()} (fid.py and demo.py fetch it there on "
                      f"first use), and no --inception PATH")


# === Preprocessing: uint8 images -> the network's 299x299 input in [-1, 1] ============================


def _tf1_axis(n_in, n_out):
    """Lower and upper source indices [n_out] and upper weights of TF1's legacy bilinear resize on one axis."""
    # TF1 (align_corners=False, no half-pixel centres) maps dst i to src i * in / out, in float32.
    scale = torch.tensor(float(n_in), dtype=torch.float32) / n_out
    src = torch.arange(n_out, dtype=torch.float32) * scale
    lower = src.floor()
    upper = src.ceil().clamp(max=n_in - 1)  # the last rows reuse the edge instead of reading past it
    return lower.long(), upper.long(), src - lower


def resize_tf1_bilinear(x, size):
    """Float NCHW [N, C, H, W] -> [N, C, size, size] with TF1's ResizeBilinear (no antialias), as the TF graph does."""
    lo, hi, w = _tf1_axis(x.shape[-1], size)
    left, right = x[..., lo], x[..., hi]
    x = left + (right - left) * w.to(x.device)  # columns first, then rows, like TF's top/bottom lerps
    lo, hi, w = _tf1_axis(x.shape[-2], size)
    top, bottom = x[..., lo, :], x[..., hi, :]
    return top + (bottom - top) * w.to(x.device)[:, None]


def preprocess(images, mode="adm"):
    """uint8 tensor [N, H, W, 3] in 0..255 -> float32 [N, 3, 299, 299] in [-1, 1], per `mode` (adm | pytorch-fid)."""
    x = images.permute(0, 3, 1, 2).float()
    if mode == "adm":  # the TF graph: ResizeBilinear on 0..255, then (x - 128) / 128
        return (resize_tf1_bilinear(x, 299) - 128) / 128
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
