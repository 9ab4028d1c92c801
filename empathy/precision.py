"""Where and how the arithmetic runs: the device (--cuda), and the precision
(--precision): which precisions this device runs well, and the contexts that run a
forward pass in one.

fp32 runs no autocast context at all, so float32 results are exactly those of a
toolkit without the flag; bf16 and fp16 autocast the forward pass while weights,
optimizer state and checkpoints stay float32.
"""
import contextlib
import sys
from pathlib import Path

from .utils import ToolkitError


_warned_no_cuda = False


def get_device(cuda):
    """The device a script runs on: the GPU when `--cuda` is given and one exists.
    Asking for one without having it warns once and falls back to the CPU."""
    import torch
    global _warned_no_cuda
    if not cuda:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _warned_no_cuda:
        print("warning: --cuda given but no GPU is available; running on the CPU",
              file=sys.stderr)
        _warned_no_cuda = True
    return torch.device("cpu")


PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # names in torch


def fast_bf16_cpu():
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without
    either, PyTorch's bfloat16 matrix products run ~50x slower than float32 (measured on
    an AMD EPYC with AVX2 only: 1.3 against 60-100 GFLOP/s)."""
    import torch
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(checks):
        return any(check() for check in checks)
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def check_precision(precision, device):
    """Refuse, in one line, a --precision this device cannot run well."""
    import torch
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ToolkitError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision}")
    if precision == "fp16" and device.type != "cuda":
        raise ToolkitError("--precision fp16 needs a GPU (--cuda); on the CPU use bf16 "
                           "(on CPUs with AVX512-BF16 or AMX) or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ToolkitError("--precision bf16: this GPU has no bfloat16; use fp16 or fp32")
    if precision == "bf16" and device.type == "cpu" and not fast_bf16_cpu():
        raise ToolkitError(f"--precision bf16: this CPU ({torch.backends.cpu.get_cpu_capability()}, "
                           "no AVX512-BF16 or AMX) runs bfloat16 many times slower than "
                           "float32; use fp32")


def autocast(precision, device):
    """The context that runs a forward pass in `precision`: none at all for fp32, so
    float32 runs exactly as they did before the flag; weights stay float32 throughout."""
    import torch
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN cannot build a bfloat16 LSTM for such a CPU: PyTorch's own LSTM runs
        # instead. Reached only where check_precision was bypassed (tests, bench.py).
        stack.enter_context(_onednn_disabled())
    dtype = getattr(torch, _AUTOCAST_DTYPES[precision])
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    return stack


@contextlib.contextmanager
def _onednn_disabled():
    # Not torch.backends.mkldnn.flags(): it also sets TF32, which warns on every use.
    import torch
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def grad_scaler(precision, device):
    """A gradient scaler for fp16 (its small range underflows gradients); None otherwise."""
    import torch
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)

