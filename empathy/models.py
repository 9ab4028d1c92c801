"""Model families, one class each (`--model`; their registry and size flags are in
families.py, which loads no torch).

A family is a class that predicts one valence per second from the modalities'
per-second features (see `FusionModel` for the interface: `embed`,
`forward_embedded`, `config`, `from_config`) plus one entry in
`families.FAMILIES`, which names the class and declares its flags.
Its checkpoints name the family in their configuration, so every script rebuilds
the right model from the file alone (checkpoints.load_model).

Every family starts alike: per second, each modality goes through dropout ->
linear -> ReLU into a 128-d embedding, and the embeddings are concatenated; and
ends alike: a decoder (states -> 128 -> ReLU -> 1) gives the valence, its first
layer the 128-d decision-level features. Between them:

- `lstm`, the guide's model: an attention head turns the concatenation into 3
  weights per step; a one-layer LSTM (hidden 512) runs over it; the context at step
  t is the weighted sum of the LSTM states at t, t-1 and t-2 (zero before the
  start). Optionally (--layers, --bidirectional) the LSTM is stacked or runs both
  ways; the decoder then takes the concatenated directions (1024 wide). --hidden_dim
  sizes it; --dropout (default 0, none) drops recurrent states in training.
- `gru`: the same with a GRU.
- `tcn`: residual blocks of centred dilated 1-D convolutions (TemporalConvNet).
- `transformer`: a Transformer encoder with sinusoidal positions and an optional
  local attention window (FusionTransformer).

The LSTM's module names match the original release (`embed_<mod>.1.weight`,
`attn.0.weight`, `lstm.weight_ih_l0`, `dec_target.2.bias`, ...), so its plain
state_dicts load as is.
"""
import math
import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import families
from .utils import ToolkitError

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


class FusionModel(nn.Module):
    """What every family shares: the per-modality embeddings, the padding of
    back-to-back rows, and the decoder whose first layer gives the decision-level
    features. A family builds its sequence model between them (`sequence_states`).

    Inputs are sequences stored back to back (see `datasets.Batch`): per modality a
    (total_steps, dim) tensor, plus the length of each sequence. The model pads
    them internally; outputs come back in the same back-to-back order, so padded
    steps never reach a loss or a metric, and no family lets a padded step change a
    valid one (a video predicts the same alone and in a batch).

    The interface every family offers: `embed` (per-step embeddings, computed on
    unpadded rows), `forward_embedded` (predictions and, if asked, the 128-d
    decision-level features), `config` (plain values that rebuild the model with
    `from_config`) and `check_sizes` (sizes that do not fit together). Its constructor
    takes the options of its flags (families.FAMILIES).
    """
    FAMILY = None  # its name in families.FAMILIES
    HEAD = ()  # the output layers that personalize.py --finetune head updates (module names)

    def _add_embeddings(self, input_dims, embed_dim):
        """Per modality: dropout -> linear -> ReLU into `embed_dim`; returns the width
        of their concatenation."""
        self.input_dims = dict(input_dims)
        self.mods = list(self.input_dims)
        for mod, dim in self.input_dims.items():
            self.add_module(f"embed_{mod}", nn.Sequential(
                InputDropout(input_dropout(mod)), nn.Linear(dim, embed_dim), nn.ReLU()))
        return embed_dim * len(self.mods)

    def _add_decoder(self, state_dim, decoder_dim):
        self.dec_target = nn.Sequential(nn.Linear(state_dim, decoder_dim), nn.ReLU(),
                                        nn.Linear(decoder_dim, 1))

    def add_adapter(self, rank=1):
        """Give the model a listener adapter (see `ListenerAdapter`; personalize.py
        --finetune adapter); its configuration records it, so checkpoints rebuild it."""
        self.adapter = ListenerAdapter(self.dec_target[0].out_features, rank)
        self.config = {**self.config, "adapter": {"rank": rank}}
        return self

    def _describe(self, **sizes):
        """The configuration: family, modalities, input dimensions and the sizes."""
        return {"family": self.FAMILY, "mods": self.mods, "input_dims": self.input_dims,
                **sizes}

    @classmethod
    def from_config(cls, config):
        dims = {mod: int(config["input_dims"][mod]) for mod in config["mods"]}
        return cls(dims, **{key: value for key, value in config.items()
                            if key not in ("family", "mods", "input_dims")})

    @classmethod
    def check_sizes(cls, options):
        """Refuse, in one line, sizes that do not fit together (beyond each flag's minimum)."""

    def embed(self, inputs):
        """Per-step embeddings of every modality, concatenated: (total_steps, fused_dim).
        Applied to the unpadded rows, so no work is spent on padding."""
        return torch.cat([getattr(self, f"embed_{mod}")(inputs[mod]) for mod in self.mods], dim=-1)

    def forward_embedded(self, embedded, lengths, with_features=False):
        """Predictions (total_steps,) from embeddings; with `with_features`, also the
        decision-level features: the decoder's first layer before its ReLU."""
        lengths = lengths.cpu()
        valid = torch.arange(int(lengths.max())) < lengths[:, None]       # (B, T)
        states = self.sequence_states(embedded, valid, lengths)          # (B, T, states)
        hidden = self.dec_target[0](states[valid.to(states.device)])
        adapter = self._modules.get("adapter")  # only a personalized model has one
        if adapter is not None:
            hidden = adapter.adapt_features(hidden)
        predictions = self.dec_target[2](self.dec_target[1](hidden)).squeeze(-1)
        if adapter is not None:
            predictions = adapter.adapt_output(predictions)
        return (predictions, hidden) if with_features else predictions

    def forward(self, inputs, lengths):
        return self.forward_embedded(self.embed(inputs), lengths)

    def sequence_states(self, embedded, valid, lengths):
        """(B, T, state_dim) states of the padded batch; the decoder reads the valid ones."""
        raise NotImplementedError

    @staticmethod
    def _pad(rows, valid):
        """Back-to-back rows as (B, T, ...) with zeros where `valid` (B, T) is False.
        One scatter, where pad_sequence's backward clones the whole gradient once per
        sequence (30 ms of an ATV training epoch)."""
        positions = valid.flatten().nonzero().squeeze(1).to(rows.device)
        padded = rows.new_zeros((valid.numel(),) + rows.shape[1:]).index_copy(0, positions, rows)
        return padded.view(valid.shape + rows.shape[1:])


class RecurrentFusion(FusionModel):
    """The guide's model with the recurrent layer of the family (`RECURRENT`), stored
    under the family's name (`lstm.weight_ih_l0`, `gru.weight_ih_l0`, ...): local
    attention over the states at t, t-1 and t-2, then the decoder."""
    HEAD = ("attn", "dec_target")  # the attention weighs the states the decoder reads
    RECURRENT = None

    def __init__(self, input_dims, embed_dim=128, attn_dim=128, attn_len=3,
                 hidden_dim=512, decoder_dim=128, num_layers=1, bidirectional=False,
                 dropout=0.0):
        super().__init__()
        fused_dim = self._add_embeddings(input_dims, embed_dim)
        self.attn_len, self.dropout = attn_len, dropout
        self.attn = nn.Sequential(nn.Linear(fused_dim, attn_dim), nn.ReLU(),
                                  nn.Linear(attn_dim, attn_len), nn.Softmax(dim=-1))
        # torch's own dropout acts between stacked layers only (and warns with one layer);
        # the last layer's states get theirs in sequence_states.
        self.add_module(self.FAMILY, self.RECURRENT(
            fused_dim, hidden_dim, num_layers=num_layers, batch_first=True,
            bidirectional=bidirectional, dropout=dropout if num_layers > 1 else 0.0))
        self._add_decoder(hidden_dim * (2 if bidirectional else 1), decoder_dim)
        self.config = self._describe(
            embed_dim=embed_dim, attn_dim=attn_dim, attn_len=attn_len, hidden_dim=hidden_dim,
            decoder_dim=decoder_dim, num_layers=num_layers, bidirectional=bidirectional,
            dropout=dropout)

    @property
    def recurrent(self):
        return getattr(self, self.FAMILY)

    def sequence_states(self, embedded, valid, lengths):
        """The context at each step: the attention's weighted sum of the recurrent
        states at t, t-1 and t-2 (zero before the start)."""
        weights = self._pad(self.attn(embedded), valid)                  # (B, T, attn_len)
        states = self._run_recurrent(self._pad(embedded, valid), lengths)  # (B, T, states)
        if self.dropout:  # skipped at 0, so the default draws no random numbers: runs unchanged
            states = F.dropout(states, self.dropout, self.training)
        context = weights[..., :1] * states
        for lag in range(1, self.attn_len):
            context = context + weights[..., lag:lag + 1] * F.pad(states, (0, 0, lag, 0))[:, :-lag]
        return context

    def _run_recurrent(self, padded, lengths):
        if not self.recurrent.bidirectional:
            # Forwards only, with padding at the end: padded steps cannot influence
            # valid ones, and the unpacked layer is the faster one.
            return self.recurrent(padded)[0]
        # Backwards, the padding would come first: pack so each sequence starts at its end.
        packed = pack_padded_sequence(padded, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(self.recurrent(packed)[0], batch_first=True,
                                   total_length=padded.shape[1])[0]

    @classmethod
    def from_config(cls, config):
        dims = {mod: int(config["input_dims"][mod]) for mod in config["mods"]}
        sizes = {key: int(config[key]) for key in
                 ("embed_dim", "attn_dim", "attn_len", "hidden_dim", "decoder_dim")}
        # Checkpoints from before --layers, --bidirectional and --dropout lack their keys.
        return cls(dims, **sizes, num_layers=int(config.get("num_layers", 1)),
                   bidirectional=bool(config.get("bidirectional", False)),
                   dropout=float(config.get("dropout", 0.0)))

    @classmethod
    def config_from_state_dict(cls, state_dict):
        """The configuration, rebuilt from the shapes in a plain state_dict (the
        original release saved nothing else)."""
        mods = [match.group(1) for key in state_dict
                if (match := re.fullmatch(r"embed_(\w+)\.1\.weight", key))]
        return {
            "family": cls.FAMILY,
            "mods": mods,
            "input_dims": {mod: state_dict[f"embed_{mod}.1.weight"].shape[1] for mod in mods},
            "embed_dim": state_dict[f"embed_{mods[0]}.1.weight"].shape[0],
            "attn_dim": state_dict["attn.0.weight"].shape[0],
            "attn_len": state_dict["attn.2.weight"].shape[0],
            "hidden_dim": state_dict[f"{cls.FAMILY}.weight_hh_l0"].shape[1],
            "decoder_dim": state_dict["dec_target.0.weight"].shape[0],
            "num_layers": sum(1 for key in state_dict
                              if re.fullmatch(rf"{cls.FAMILY}\.weight_hh_l\d+", key)),
            "bidirectional": f"{cls.FAMILY}.weight_hh_l0_reverse" in state_dict,
            "dropout": 0.0,  # has no weights; the original release had none
        }


class FusionLSTM(RecurrentFusion):
    """The guide's model (`--model lstm`): feature-level fusion of modalities, one
    valence prediction per second, through an LSTM with local attention."""
    FAMILY = "lstm"
    RECURRENT = nn.LSTM


class FusionGRU(RecurrentFusion):
    """`--model gru`: the guide's model with a GRU (as in the MuSe and AVEC
    baselines) in place of the LSTM: three gates to its four, no cell state."""
    FAMILY = "gru"
    RECURRENT = nn.GRU


class TemporalBlock(nn.Module):
    """A residual block of two dilated 1-D convolutions, centred on each step.
    Steps outside a sequence (`mask` 0) are zeroed after each convolution, so that
    to the next one the padding is exactly the zeros beyond a sequence's ends."""

    def __init__(self, channels, kernel, dilation):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, kernel, dilation=dilation)
                                   for _ in range(2))
        span = dilation * (kernel - 1)
        self.padding = (span // 2, span - span // 2)  # an even kernel looks one step further ahead

    def forward(self, inputs, mask):
        hidden = inputs
        for conv in self.convs:
            hidden = torch.relu(conv(F.pad(hidden, self.padding))) * mask
        return torch.relu(inputs + hidden)  # zero at padded steps: both terms are


class TemporalConvNet(FusionModel):
    """`--model tcn`: a temporal convolutional network over the fused embeddings.

    The embeddings are projected to `channels`, then go through `num_blocks`
    residual blocks whose dilation doubles (1, 2, 4, ...), each of two convolutions
    of `kernel` steps. The convolutions are centred, not causal: the task is offline
    (a whole video is known before any of it is scored), and listeners react to what
    they are about to hear as much as to what they heard. A step sees
    `receptive_field` steps around it: 61 (30 s each side) with the defaults.
    The decoder (channels -> 128 -> ReLU -> 1) is the LSTM's.
    """
    FAMILY = "tcn"
    HEAD = ("dec_target",)

    def __init__(self, input_dims, embed_dim=128, channels=128, kernel=3, num_blocks=4,
                 decoder_dim=128):
        super().__init__()
        fused_dim = self._add_embeddings(input_dims, embed_dim)
        self.project = nn.Linear(fused_dim, channels)
        self.blocks = nn.ModuleList(TemporalBlock(channels, kernel, 2 ** block)
                                    for block in range(num_blocks))
        self._add_decoder(channels, decoder_dim)
        self.config = self._describe(embed_dim=embed_dim, channels=channels, kernel=kernel,
                                     num_blocks=num_blocks, decoder_dim=decoder_dim)

    @property
    def receptive_field(self):
        """Steps that can change one step's prediction, itself included."""
        config = self.config
        return 1 + 2 * (config["kernel"] - 1) * (2 ** config["num_blocks"] - 1)

    def sequence_states(self, embedded, valid, lengths):
        # Projected on the unpadded rows, so padded steps start at exactly zero.
        hidden = self._pad(self.project(embedded), valid).transpose(1, 2)   # (B, C, T)
        mask = valid.to(hidden.device)[:, None, :].to(hidden.dtype)
        for block in self.blocks:
            hidden = block(hidden, mask)
        return hidden.transpose(1, 2)


def sinusoidal_positions(positions, width):
    """(..., width) sinusoidal encoding of the integer `positions` (Vaswani et al.
    2017): sines in even columns, cosines in odd ones, wavelengths from 2 pi to
    10000 * 2 pi steps."""
    rates = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=positions.device)
                      * (-math.log(10000.0) / width))
    angles = positions.float()[..., None] * rates                         # (..., ceil(w/2))
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)[..., :width]


class FusionTransformer(FusionModel):
    """`--model transformer`: a Transformer encoder over the fused embeddings.

    The embeddings are projected to `model_dim`, sinusoidal positions are added
    (from 0 at each video's start; from a random start in training, see `_starts`), and `num_layers` pre-norm encoder layers
    run over them. With `attn_window` W > 0 a step attends only to the steps within
    W seconds of it: training pieces are short (60 s with --split 5 of 300-s videos),
    so a window keeps what a step attends to in evaluation on whole videos like what
    it attended to in training. Padded steps are hidden from every valid one; each attends
    only to itself, so that no row of the attention is empty. The decoder
    (model_dim -> 128 -> ReLU -> 1) is the LSTM's.
    """
    FAMILY = "transformer"
    HEAD = ("dec_target",)
    MAX_START = 600  # s: longer than the OMG-Empathy stories (up to about 8 minutes)

    def __init__(self, input_dims, embed_dim=128, model_dim=128, num_layers=2, num_heads=4,
                 ff_dim=256, attn_window=30, dropout=0.1, decoder_dim=128):
        super().__init__()
        fused_dim = self._add_embeddings(input_dims, embed_dim)
        self.project = nn.Linear(fused_dim, model_dim)
        layer = nn.TransformerEncoderLayer(model_dim, num_heads, ff_dim, dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(model_dim),
                                             enable_nested_tensor=False)
        self._add_decoder(model_dim, decoder_dim)
        self.num_heads, self.attn_window = num_heads, attn_window
        self.config = self._describe(
            embed_dim=embed_dim, model_dim=model_dim, num_layers=num_layers,
            num_heads=num_heads, ff_dim=ff_dim, attn_window=attn_window, dropout=dropout,
            decoder_dim=decoder_dim)

    @classmethod
    def check_sizes(cls, options):
        width, heads = options.get("model_dim", 128), options.get("num_heads", 4)
        if width % heads:
            raise ToolkitError(f"--transformer_dim ({width}) must be a multiple of "
                               f"--transformer_heads ({heads})")

    def sequence_states(self, embedded, valid, lengths):
        hidden = self._pad(self.project(embedded), valid)                 # (B, T, model_dim)
        positions = torch.arange(valid.shape[1], device=hidden.device) + self._starts(valid)
        hidden = hidden + sinusoidal_positions(positions, hidden.shape[-1])
        return self.encoder(hidden, mask=self._attention_mask(valid.to(hidden.device)))

    def _starts(self, valid):
        """(B, 1) position of each sequence's first step: 0 in evaluation, where whole
        videos run; in training, whose pieces are short, a random one up to
        MAX_START, so that the later positions of a whole video are not new to the
        model in evaluation."""
        if not self.training:
            return torch.zeros(valid.shape[0], 1, dtype=torch.long, device=valid.device)
        return torch.randint(0, self.MAX_START + 1, (valid.shape[0], 1), device=valid.device)

    def _attention_mask(self, valid):
        """(B * heads, T, T), True where query step i may not attend to key step j."""
        steps = torch.arange(valid.shape[1], device=valid.device)
        allowed = valid[:, None, :]                                       # keys in the sequence
        if self.attn_window:
            allowed = allowed & ((steps[:, None] - steps[None, :]).abs() <= self.attn_window)
        allowed = allowed | (steps[:, None] == steps[None, :])            # no empty row
        return ~allowed.repeat_interleave(self.num_heads, dim=0)


class ListenerAdapter(nn.Module):
    """A listener's correction of a frozen model (personalize.py --finetune adapter), a
    few hundred parameters: a rank-`rank` residual on the decoder's 128-d features
    (features + up(down(features))) and an affine map of the output
    ((1 + gain) * prediction + shift). `up`, `gain` and `shift` start at zero, so an
    untrained adapter changes no prediction, and weight decay pulls it back toward
    the shared model."""

    def __init__(self, width, rank=1):
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)
        nn.init.zeros_(self.up.weight)
        self.gain = nn.Parameter(torch.zeros(()))
        self.shift = nn.Parameter(torch.zeros(()))

    def adapt_features(self, features):
        return features + self.up(self.down(features))

    def adapt_output(self, predictions):
        return predictions * (1 + self.gain) + self.shift


# ---------------------------------------------------------------- building by family

def create(name, input_dims, **options):
    """A new model of family `name` (families.FAMILIES) for inputs of `input_dims`
    ({mod: dim})."""
    return families.family(name).network(input_dims, **options)


def from_config(config):
    """The model a checkpoint's configuration describes (its family's own keys)."""
    name = config.get("family", families.DEFAULT_MODEL)
    if name not in families.FAMILIES:
        raise ToolkitError(f"model family {name!r} is not one this toolkit knows "
                           f"({', '.join(families.FAMILIES)}): update the toolkit")
    model = families.FAMILIES[name].network.from_config(
        {key: value for key, value in config.items() if key != "adapter"})
    if config.get("adapter"):  # a personalized model's listener adapter
        model.add_adapter(**config["adapter"])
    return model


def config_from_state_dict(state_dict):
    """The configuration of a plain state_dict: the original release's LSTM."""
    return families.family(families.DEFAULT_MODEL).network.config_from_state_dict(state_dict)
