"""The feature-level fusion LSTM with local attention, and loading it from checkpoints.

Per second, each modality goes through dropout -> linear -> ReLU into a 128-d
embedding; the embeddings are concatenated. An attention head turns the
concatenation into 3 weights per step; a one-layer LSTM (hidden 512) runs over it;
the context at step t is the weighted sum of the LSTM states at t, t-1 and t-2
(zero before the start); a decoder (512 -> 128 -> ReLU -> 1) gives the valence.
Optionally (--layers, --bidirectional) the LSTM is stacked or runs both ways; the
decoder then takes the concatenated directions (1024 wide).

Module names match the original release (`embed_<mod>.1.weight`, `attn.0.weight`,
`lstm.weight_ih_l0`, `dec_target.2.bias`, ...), so its plain state_dicts load as is.
"""
import contextlib
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import utils
from utils import ToolkitError

VISUAL_MODS = ("v_sub", "v_act")
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------- precision

def fast_bf16_cpu():
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Without
    either, PyTorch's bfloat16 matrix products run ~50x slower than float32 (measured on
    an AMD EPYC with AVX2 only: 1.3 against 60-100 GFLOP/s)."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(checks):
        return any(check() for check in checks)
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def check_precision(precision, device):
    """Refuse, in one line, a --precision this device cannot run well."""
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
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # oneDNN cannot build a bfloat16 LSTM for such a CPU: PyTorch's own LSTM runs
        # instead. Reached only where check_precision was bypassed (tests, bench.py).
        stack.enter_context(_onednn_disabled())
    stack.enter_context(torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision]))
    return stack


@contextlib.contextmanager
def _onednn_disabled():
    # Not torch.backends.mkldnn.flags(): it also sets TF32, which warns on every use.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def grad_scaler(precision, device):
    """A gradient scaler for fp16 (its small range underflows gradients); None otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def input_dropout(mod):
    """Visual features are larger and noisier, so they get more dropout."""
    return 0.2 if mod in VISUAL_MODS else 0.1


class InputDropout(nn.Dropout):
    """Dropout for input features, which need no gradient.

    With 4096-d visual features, nn.Dropout's one random draw per element was the
    largest cost of a training step. This draws 64-bit integers and uses each as four
    16-bit numbers, a quarter of the draws: an element is dropped with probability
    round(p * 65536) / 65536 (within 1e-5 of p) and the others are scaled to keep the
    expectation. Inputs that need a gradient, and evaluation, use nn.Dropout.
    """

    def forward(self, inputs):
        if not self.training or self.p == 0 or inputs.requires_grad:
            return super().forward(inputs)
        threshold = round(self.p * 65536)
        draws = -(-inputs.numel() // 4)
        bits = torch.randint(-2**63, 2**63 - 1, (draws,), dtype=torch.int64, device=inputs.device)
        drop = bits.view(torch.int16)[:inputs.numel()].view(inputs.shape) < threshold - 32768
        del bits  # before the output is allocated: lowers the peak
        # torch.where, not a product with the mask: multiplying by a bool tensor first
        # converts it to a float copy as large as the inputs (3x slower, and memory).
        return torch.where(drop, 0.0, inputs).mul_(65536 / (65536 - threshold))


class FusionLSTM(nn.Module):
    """Feature-level fusion of modalities, one valence prediction per second.

    Inputs are sequences stored back to back (see `datasets.Batch`): per modality a
    (total_steps, dim) tensor, plus the length of each sequence. The model pads
    them internally; outputs come back in the same back-to-back order, so padded
    steps never reach a loss or a metric.
    """

    def __init__(self, input_dims, embed_dim=128, attn_dim=128, attn_len=3,
                 hidden_dim=512, decoder_dim=128, num_layers=1, bidirectional=False):
        super().__init__()
        self.input_dims = dict(input_dims)
        self.mods = list(self.input_dims)
        self.attn_len = attn_len
        for mod, dim in self.input_dims.items():
            self.add_module(f"embed_{mod}", nn.Sequential(
                InputDropout(input_dropout(mod)), nn.Linear(dim, embed_dim), nn.ReLU()))
        fused_dim = embed_dim * len(self.mods)
        self.attn = nn.Sequential(nn.Linear(fused_dim, attn_dim), nn.ReLU(),
                                  nn.Linear(attn_dim, attn_len), nn.Softmax(dim=-1))
        self.lstm = nn.LSTM(fused_dim, hidden_dim, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional)
        state_dim = hidden_dim * (2 if bidirectional else 1)
        self.dec_target = nn.Sequential(nn.Linear(state_dim, decoder_dim), nn.ReLU(),
                                        nn.Linear(decoder_dim, 1))
        self.config = {"mods": self.mods, "input_dims": self.input_dims,
                       "embed_dim": embed_dim, "attn_dim": attn_dim, "attn_len": attn_len,
                       "hidden_dim": hidden_dim, "decoder_dim": decoder_dim,
                       "num_layers": num_layers, "bidirectional": bidirectional}

    def embed(self, inputs):
        """Per-step embeddings of every modality, concatenated: (total_steps, fused_dim).
        Applied to the unpadded rows, so no work is spent on padding."""
        return torch.cat([getattr(self, f"embed_{mod}")(inputs[mod]) for mod in self.mods], dim=-1)

    def forward_embedded(self, embedded, lengths, with_features=False):
        """Predictions (total_steps,) from embeddings; with `with_features`, also the
        decision-level features: the decoder's first layer before its ReLU."""
        lengths = lengths.cpu()
        valid = torch.arange(int(lengths.max())) < lengths[:, None]       # (B, T)
        weights = self._pad(self.attn(embedded), valid)                 # (B, T, attn_len)
        states = self._run_lstm(self._pad(embedded, valid), lengths)    # (B, T, states)
        context = weights[..., :1] * states
        for lag in range(1, self.attn_len):
            context = context + weights[..., lag:lag + 1] * F.pad(states, (0, 0, lag, 0))[:, :-lag]
        hidden = self.dec_target[0](context[valid.to(context.device)])
        predictions = self.dec_target[2](self.dec_target[1](hidden)).squeeze(-1)
        return (predictions, hidden) if with_features else predictions

    def forward(self, inputs, lengths):
        return self.forward_embedded(self.embed(inputs), lengths)

    def _run_lstm(self, padded, lengths):
        if not self.lstm.bidirectional:
            # Forwards only, with padding at the end: padded steps cannot influence
            # valid ones, and the unpacked LSTM is the faster one.
            return self.lstm(padded)[0]
        # Backwards, the padding would come first: pack so each sequence starts at its end.
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                   total_length=padded.shape[1])[0]

    @staticmethod
    def _pad(rows, valid):
        """Back-to-back rows as (B, T, ...) with zeros where `valid` (B, T) is False.
        One scatter, where pad_sequence's backward clones the whole gradient once per
        sequence (30 ms of an ATV training epoch)."""
        positions = valid.flatten().nonzero().squeeze(1).to(rows.device)
        padded = rows.new_zeros((valid.numel(),) + rows.shape[1:]).index_copy(0, positions, rows)
        return padded.view(valid.shape + rows.shape[1:])


def config_from_state_dict(state_dict):
    """Rebuild the model's configuration from the shapes in a plain state_dict
    (the original release saved nothing else)."""
    mods = [match.group(1) for key in state_dict
            if (match := re.fullmatch(r"embed_(\w+)\.1\.weight", key))]
    return {
        "mods": mods,
        "input_dims": {mod: state_dict[f"embed_{mod}.1.weight"].shape[1] for mod in mods},
        "embed_dim": state_dict[f"embed_{mods[0]}.1.weight"].shape[0],
        "attn_dim": state_dict["attn.0.weight"].shape[0],
        "attn_len": state_dict["attn.2.weight"].shape[0],
        "hidden_dim": state_dict["lstm.weight_hh_l0"].shape[1],
        "decoder_dim": state_dict["dec_target.0.weight"].shape[0],
        "num_layers": sum(1 for key in state_dict if re.fullmatch(r"lstm\.weight_hh_l\d+", key)),
        "bidirectional": "lstm.weight_hh_l0_reverse" in state_dict,
    }


def model_from_config(config):
    dims = {mod: int(config["input_dims"][mod]) for mod in config["mods"]}
    sizes = {key: int(config[key]) for key in
             ("embed_dim", "attn_dim", "attn_len", "hidden_dim", "decoder_dim")}
    # Checkpoints from before --layers and --bidirectional have neither key.
    return FusionLSTM(dims, **sizes, num_layers=int(config.get("num_layers", 1)),
                      bidirectional=bool(config.get("bidirectional", False)))


def load_model(path, mods, input_dims, device="cpu"):
    """The model saved at `path`, checked against the data it is about to see.

    Returns (model, checkpoint). The checkpoint's own modality order wins (it fixes
    the layout of the fused layers); the set of modalities and every input
    dimension must match `mods` and `input_dims`.
    """
    checkpoint = utils.load_checkpoint(path, device)
    state_dict = checkpoint["model"]
    try:
        config = checkpoint.get("config") or config_from_state_dict(state_dict)
        model = model_from_config(config)
        model.load_state_dict(state_dict)
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError):
        raise ToolkitError(f"checkpoint {path} is not a fusion-LSTM checkpoint (its "
                           "parameters do not match the model): use a checkpoint written "
                           "by train.py or by the original release") from None
    if set(model.mods) != set(mods):
        raise ToolkitError(f"checkpoint {path} was trained on --mods {','.join(model.mods)}, "
                           f"not {','.join(mods)}: run with --mods {','.join(model.mods)}")
    for mod in model.mods:
        if model.input_dims[mod] != input_dims[mod]:
            raise ToolkitError(f"checkpoint {path} expects {model.input_dims[mod]}-d {mod} "
                               f"features but the data has {input_dims[mod]}: use the data "
                               "it was trained on, or retrain")
    return model.to(device), checkpoint
