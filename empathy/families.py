"""The model families by name (`--model`): the registry `FAMILIES`, each entry
naming its class in models.py and declaring the flags that size it.

The registry loads no torch: every script builds its flags (and its `--help`) and
checks their values from here, and a family's class, with torch, is imported only
when a model is built. A new family is one class in models.py and one entry here.
"""
import argparse
import importlib
from dataclasses import dataclass, field

from .utils import ToolkitError


@dataclass(frozen=True)
class ModelFlag:
    """A command-line flag that sizes a model family: `flag` sets the constructor
    argument `option`; `minimum` and `maximum` bound its number (the maximum keeps
    a typo such as --tcn_blocks 64 from asking for more memory than any machine has)."""
    flag: str
    option: str
    arguments: dict = field(default_factory=dict)
    minimum: int = None
    maximum: int = None

    @property
    def dest(self):
        return self.flag.lstrip("-")


def size_flag(flag, option, default, text, maximum, minimum=1, metavar="N"):
    """A ModelFlag for an integer size from `minimum` to `maximum`; `text` is its help,
    to which the range and the default are added."""
    return ModelFlag(flag, option, dict(type=int, default=default, metavar=metavar,
                                        help=f"{text} ({minimum} to {maximum}; default: "
                                             "%(default)s)"),
                     minimum=minimum, maximum=maximum)


@dataclass(frozen=True)
class Family:
    """One model family: the name of its class in `module` (imported on first use, so
    that reading the flags loads no torch) and the flags that size it."""
    class_name: str
    flags: tuple = ()
    module: str = "empathy.models"

    @property
    def network(self):
        """The family's class (an nn.Module: importing it loads torch)."""
        return getattr(importlib.import_module(self.module), self.class_name)


RECURRENT_FLAGS = (  # shared by the lstm and gru families, so declared once
    size_flag("--layers", "num_layers", 1, "stacked recurrent layers of --model lstm or gru",
              maximum=16),
    size_flag("--hidden_dim", "hidden_dim", 512, "--model lstm or gru: hidden size of each "
              "recurrent layer (per direction)", maximum=8192),
    ModelFlag("--dropout", "dropout", dict(
        type=float, default=0.0, metavar="P",
        help="--model lstm or gru: dropout on the recurrent states, between stacked layers and "
             "before the attention (0 to 0.9; default: %(default)s, none, as in the guide)"),
              minimum=0.0, maximum=0.9),
    ModelFlag("--bidirectional", "bidirectional", dict(
        action="store_true", help="--model lstm or gru: run the recurrent layers forwards and "
                                  "backwards; the attention and the decoder take both "
                                  "directions' states")),
)

TCN_FLAGS = (
    size_flag("--tcn_channels", "channels", 128, "--model tcn: channels of every convolution",
              maximum=2048),
    size_flag("--tcn_kernel", "kernel", 3, "--model tcn: kernel size of the convolutions",
              maximum=31, minimum=2, metavar="STEPS"),
    size_flag("--tcn_blocks", "num_blocks", 4, "--model tcn: residual blocks, dilations 1, "
              "2, 4, ...; a step sees 1 + 2 (kernel - 1) (2^blocks - 1) steps around it "
              "(61 s with 4 blocks of kernel 3)", maximum=12),
)

TRANSFORMER_FLAGS = (
    size_flag("--transformer_layers", "num_layers", 2, "--model transformer: encoder layers",
              maximum=24),
    size_flag("--transformer_heads", "num_heads", 4, "--model transformer: attention heads; "
              "they divide --transformer_dim", maximum=64),
    size_flag("--transformer_dim", "model_dim", 128, "--model transformer: width of the "
              "encoder", maximum=2048),
    size_flag("--transformer_ff", "ff_dim", 256, "--model transformer: width of each "
              "layer's feed-forward block", maximum=8192),
    size_flag("--attn_window", "attn_window", 30, "--model transformer: each step attends "
              "only to the steps within this many seconds of it; 0: to the whole sequence",
              maximum=3600, minimum=0, metavar="SECONDS"),
)

FAMILIES = {
    "lstm": Family("FusionLSTM", RECURRENT_FLAGS),
    "gru": Family("FusionGRU", RECURRENT_FLAGS),
    "tcn": Family("TemporalConvNet", TCN_FLAGS),
    "transformer": Family("FusionTransformer", TRANSFORMER_FLAGS),
}
DEFAULT_MODEL = "lstm"  # the guide's model; checkpoints that name no family hold one


def family(name):
    if name not in FAMILIES:
        raise ToolkitError(f"--model must be one of {', '.join(FAMILIES)}, got {name}")
    return FAMILIES[name]


def get_args_parser():
    """--model and the flags that size each family (a flag shared by several
    families is declared once)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("model")
    group.add_argument("--model", choices=FAMILIES, default=DEFAULT_MODEL,
                       help="model family: lstm (the guide's fusion LSTM), gru (the same with "
                            "a GRU), tcn (temporal convolutions) or transformer (default: "
                            "%(default)s)")
    declared = set()
    for entry in FAMILIES.values():
        for flag in entry.flags:
            if flag.flag not in declared:
                group.add_argument(flag.flag, **flag.arguments)
                declared.add(flag.flag)
    return parser


def options_from_args(name, args):
    """The constructor options of family `name` that the parsed flags give (a
    script without a family's flags keeps the defaults). A size flag of another
    family, given a value other than its default, is refused by name: it would be
    ignored, yet recorded in args.json as if it had sized the model."""
    check_other_families(name, args)
    return {flag.option: getattr(args, flag.dest) for flag in family(name).flags
            if hasattr(args, flag.dest)}


def default(flag):
    """A ModelFlag's default value (False for an on/off flag)."""
    return flag.arguments.get("default", False if flag.arguments.get("action") == "store_true"
                              else None)


def owners(flag_name):
    """The names of the families that a size flag sizes."""
    return [name for name, entry in FAMILIES.items()
            if any(flag.flag == flag_name for flag in entry.flags)]


def check_other_families(name, args):
    """Refuse a size flag given for a family other than --model `name`."""
    mine = {flag.flag for flag in family(name).flags}
    for entry in FAMILIES.values():
        for flag in entry.flags:
            value = getattr(args, flag.dest, default(flag))
            if flag.flag in mine or value == default(flag):
                continue
            given = flag.flag if value is True else f"{flag.flag} {value}"
            them = " or ".join(owners(flag.flag))
            raise ToolkitError(f"{given} sizes --model {them}, not {name}: leave it out, or "
                               f"give --model {owners(flag.flag)[0]}")


def check_options(name, options):
    """Refuse, in one line, an option outside its flag's range (NaN included), then
    sizes that do not fit together (the family class's own `check_sizes`)."""
    for flag in family(name).flags:
        value = options.get(flag.option)
        if value is None or isinstance(value, bool):
            continue
        if flag.minimum is not None and flag.maximum is not None and value != value:
            raise ToolkitError(f"{flag.flag} must be a number from {flag.minimum} to "
                               f"{flag.maximum}, got {value}")
        if flag.minimum is not None and value < flag.minimum:
            raise ToolkitError(f"{flag.flag} must be at least {flag.minimum}, got {value}")
        if flag.maximum is not None and value > flag.maximum:
            raise ToolkitError(f"{flag.flag} must be at most {flag.maximum}, got {value}")
    check_sizes = getattr(family(name).network, "check_sizes", None)
    if check_sizes is not None:
        check_sizes(options)


def option_flag(name, option):
    """The flag that sets constructor option `option` of family `name` (for messages)."""
    for flag in FAMILIES.get(name, FAMILIES[DEFAULT_MODEL]).flags:
        if flag.option == option:
            return flag.flag
    return option
