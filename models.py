"""Model families, one class each, and the registry that names them (`--model`).

A family is a class that predicts one valence per second from the modalities'
per-second features (see `FusionLSTM` for the interface: `embed`,
`forward_embedded`, `config`, `FLAGS`, `from_config`) plus one entry in `MODELS`.
Its checkpoints name the family in their configuration, so every script rebuilds
the right model from the file alone (checkpoints.load_model).

The guide's family, `lstm`, is the feature-level fusion LSTM with local attention.

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
import argparse
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from utils import ToolkitError

VISUAL_MODS = ("v_sub", "v_act")


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


@dataclass(frozen=True)
class ModelFlag:
    """A command-line flag that sizes a model family: `flag` sets the constructor
    argument `option`; `minimum` bounds an integer."""
    flag: str
    option: str
    arguments: dict = field(default_factory=dict)
    minimum: int = None

    @property
    def dest(self):
        return self.flag.lstrip("-")


class FusionLSTM(nn.Module):
    """Feature-level fusion of modalities, one valence prediction per second.

    Inputs are sequences stored back to back (see `datasets.Batch`): per modality a
    (total_steps, dim) tensor, plus the length of each sequence. The model pads
    them internally; outputs come back in the same back-to-back order, so padded
    steps never reach a loss or a metric.

    The interface every family offers: `embed` (per-step embeddings, computed on
    unpadded rows), `forward_embedded` (predictions and, if asked, the 128-d
    decision-level features), `config` (plain values that rebuild the model with
    `from_config`), and `FLAGS` (the flags that size it).
    """
    FLAGS = (
        ModelFlag("--layers", "num_layers", dict(type=int, default=1, metavar="N",
                  help="stacked LSTM layers (default: %(default)s)"), minimum=1),
        ModelFlag("--bidirectional", "bidirectional", dict(
            action="store_true", help="run the LSTM forwards and backwards; the attention "
                                      "and the decoder take both directions' states")),
    )

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
        self.config = {"family": "lstm", "mods": self.mods, "input_dims": self.input_dims,
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



    @classmethod
    def from_config(cls, config):
        dims = {mod: int(config["input_dims"][mod]) for mod in config["mods"]}
        sizes = {key: int(config[key]) for key in
                 ("embed_dim", "attn_dim", "attn_len", "hidden_dim", "decoder_dim")}
        # Checkpoints from before --layers and --bidirectional have neither key.
        return cls(dims, **sizes, num_layers=int(config.get("num_layers", 1)),
                   bidirectional=bool(config.get("bidirectional", False)))

    @staticmethod
    def config_from_state_dict(state_dict):
        """The configuration, rebuilt from the shapes in a plain state_dict (the
        original release saved nothing else)."""
        mods = [match.group(1) for key in state_dict
                if (match := re.fullmatch(r"embed_(\w+)\.1\.weight", key))]
        return {
            "family": "lstm",
            "mods": mods,
            "input_dims": {mod: state_dict[f"embed_{mod}.1.weight"].shape[1] for mod in mods},
            "embed_dim": state_dict[f"embed_{mods[0]}.1.weight"].shape[0],
            "attn_dim": state_dict["attn.0.weight"].shape[0],
            "attn_len": state_dict["attn.2.weight"].shape[0],
            "hidden_dim": state_dict["lstm.weight_hh_l0"].shape[1],
            "decoder_dim": state_dict["dec_target.0.weight"].shape[0],
            "num_layers": sum(1 for key in state_dict
                              if re.fullmatch(r"lstm\.weight_hh_l\d+", key)),
            "bidirectional": "lstm.weight_hh_l0_reverse" in state_dict,
        }


# ---------------------------------------------------------------- the registry

MODELS = {"lstm": FusionLSTM}
DEFAULT_MODEL = "lstm"  # the guide's model; checkpoints that name no family hold one


def family(name):
    if name not in MODELS:
        raise ToolkitError(f"--model must be one of {', '.join(MODELS)}, got {name}")
    return MODELS[name]


def create(name, input_dims, **options):
    """A new model of family `name` for inputs of `input_dims` ({mod: dim})."""
    return family(name)(input_dims, **options)


def from_config(config):
    """The model a checkpoint's configuration describes (its family's own keys)."""
    name = config.get("family", DEFAULT_MODEL)
    if name not in MODELS:
        raise ToolkitError(f"model family {name!r} is not one this toolkit knows "
                           f"({', '.join(MODELS)}): update the toolkit")
    return MODELS[name].from_config(config)


def config_from_state_dict(state_dict):
    """The configuration of a plain state_dict: the original release's LSTM."""
    return MODELS[DEFAULT_MODEL].config_from_state_dict(state_dict)


def get_args_parser():
    """--model and the flags that size each family (a flag shared by several
    families is declared once)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL,
                       help="model family (default: %(default)s, the guide's fusion LSTM)")
    declared = set()
    for model_class in MODELS.values():
        for flag in model_class.FLAGS:
            if flag.flag not in declared:
                group.add_argument(flag.flag, **flag.arguments)
                declared.add(flag.flag)
    return parser


def options_from_args(name, args):
    """The constructor options of family `name` that the parsed flags give (a
    script without a family's flags keeps the defaults)."""
    options = {}
    for flag in family(name).FLAGS:
        if hasattr(args, flag.dest):
            options[flag.option] = getattr(args, flag.dest)
    return options


def check_options(name, options):
    """Refuse, in one line, an option below its flag's minimum."""
    for flag in family(name).FLAGS:
        value = options.get(flag.option)
        if flag.minimum is not None and value is not None and value < flag.minimum:
            raise ToolkitError(f"{flag.flag} must be at least {flag.minimum}, got {value}")


def option_flag(name, option):
    """The flag that sets constructor option `option` of family `name` (for messages)."""
    for flag in MODELS.get(name, MODELS[DEFAULT_MODEL]).FLAGS:
        if flag.option == option:
            return flag.flag
    return option
