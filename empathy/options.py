"""The options of the training scripts: their shared flag groups, the settings they
become, and the one check that runs before anything is written.

train.py, crossval.py, cv_epochs.py and personalize.py join the flag groups below
with `parents=[...]`, turn the parsed flags into `TrainingSettings` and
`RunOptions`, describe what they are about to do as a `Plan`, and call
`check_before_writing(plan)` once: every check, in one order, before the first
file is written.
"""
import argparse
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import datasets, families, layout, parallel, postprocessing, precision, utils
from .postprocessing import Postprocessing
from .utils import ToolkitError

# Loaded on first use (they load torch): the flags, --help and the flag checks need none.

# --lr_schedule: how the learning rate changes over --epochs (TrainingSettings.epoch_lr).
LR_SCHEDULES = ("constant", "cosine")
FLOAT32_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------- flags

def get_data_args_parser():
    """Flags of every script that loads data and builds models."""
    parser = argparse.ArgumentParser(add_help=False, parents=[datasets.get_split_args_parser(),
                                                             postprocessing.get_args_parser()])
    group = parser.add_argument_group("data and device")
    group.add_argument("--mods", default="audio,text,v_sub,v_act",
                       help="comma-separated modalities from audio,text,v_sub,v_act "
                            "(default: %(default)s)")
    group.add_argument("--normalize", action="store_true",
                       help="rescale every feature dimension to [-1, 1] by the training "
                            "data's min and max (stored in the checkpoint)")
    group.add_argument("--cuda", action="store_true",
                       help="run on the GPU (falls back to the CPU with a warning)")
    group.add_argument("--precision", choices=precision.PRECISIONS, default="fp32",
                       help="arithmetic of training and prediction: bf16 autocasts on CPUs with "
                            "AVX512-BF16 or AMX (refused on others, where it is many times "
                            "slower) and on GPUs; fp16 (with gradient scaling) only with --cuda; "
                            "weights and checkpoints stay float32 (default: %(default)s)")
    group.add_argument("--seed", type=int, default=1,
                       help="random seed; with --seeds N, the first of N (default: %(default)s)")
    return parser


def get_training_args_parser(weight_averaging=True):
    """Flags of every script that trains; without `weight_averaging`, no --ema and
    --swa_start (personalize.py's take several values: finetuning.get_args_parser)."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=1000, help="epochs (default: %(default)s)")
    group.add_argument("--batch_size", type=int, default=25,
                       help="video pieces per batch (default: %(default)s)")
    group.add_argument("--split", type=int, default=5,
                       help="contiguous pieces each training video is cut into "
                            "(default: %(default)s)")
    group.add_argument("--lr", type=float, default=1e-5,
                       help="Adam learning rate (default: %(default)s)")
    group.add_argument("--weight_decay", type=float, default=5e-4,
                       help="Adam weight decay (default: %(default)s)")
    group.add_argument("--lr_schedule", choices=LR_SCHEDULES, default="constant",
                       help="constant: --lr in every epoch; cosine: from --lr in epoch 1 down "
                            "half a cosine to near 0 in the last of --epochs, set at the start "
                            "of each epoch (default: %(default)s)")
    group.add_argument("--eval_freq", type=int, default=1,
                       help="evaluate on the validation set every N epochs; the best "
                            "is saved as best.save (default: %(default)s)")
    group.add_argument("--save_freq", type=int, default=100,
                       help="save epoch_<N>.save every N epochs (default: %(default)s)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in the model folder from its last.save")
    group.add_argument("--loss", choices=utils.LOSSES, default="mse",
                       help="mse: squared error over a batch's valid steps; ccc: 1 - CCC over "
                            "them (default: %(default)s)")
    group.add_argument("--patience", type=int, metavar="N",
                       help="stop when the validation CCC has not improved for N evaluations "
                            "(default: train all --epochs)")
    group.add_argument("--tensorboard", metavar="DIR",
                       help="write each run's per-epoch training loss, validation CCC and "
                            "learning rate as TensorBoard events under DIR/<model folder> "
                            "(per fold, seed and subject); view with tensorboard --logdir DIR "
                            "(default: none)")
    group.add_argument("--seeds", type=int, default=1, metavar="N",
                       help="train N models, seeds --seed to --seed+N-1, in seed_<s>/ folders; "
                            "report mean +- std of their CCC and score and write the average "
                            "of their predictions (default: %(default)s)")
    group = parser.add_argument_group(
        "averaging over epochs", "the last epoch as good as the best, with nothing picked on "
        "the validation videos")
    if weight_averaging:
        group.add_argument("--ema", type=float, metavar="DECAY",
                           help="validate, save and predict with an exponential moving average "
                                "of the weights, updated after every step: average = DECAY * "
                                "average + (1 - DECAY) * weights, DECAY in [0, 1) "
                                "(default: off)")
        group.add_argument("--swa_start", type=int, metavar="EPOCH",
                           help="stochastic weight averaging: validate, save and predict with "
                                "the mean of the weights at the end of epoch EPOCH and of every "
                                "later epoch (default: off)")
    group.add_argument("--average_last", type=int, metavar="K",
                       help="the run's validation prediction is the mean of the last K epochs' "
                            "per-second predictions (each of them is evaluated); metrics.csv "
                            "gives its CCC as val_ccc_average (default: off)")
    return parser


def get_fold_args_parser():
    """Flags of every script that works on cross-validation folds."""
    parser = argparse.ArgumentParser(add_help=False,
                                     parents=[parallel.get_parallel_args_parser("run folds")])
    group = parser.add_argument_group("folds")
    group.add_argument("--out_dir", default="./cv_out",
                       help="folder of the folds val_on_<story>/ (default: %(default)s)")
    group.add_argument("--stories", type=int, nargs="+", metavar="STORY",
                       help="keep only these stories (default: all in both folders)")
    group.add_argument("--subjects", type=int, nargs="+", metavar="S",
                       help="keep only these subjects (default: all)")
    return parser


def get_model_args_parser():
    """Flags of the scripts that build new models: --model and each family's sizes."""
    return families.get_args_parser()


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class TrainingSettings:
    """The hyper-parameters of one training run (one seed's, with `seed`)."""
    epochs: int = 1000
    batch_size: int = 25
    split: int = 5
    lr: float = 1e-5
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    eval_freq: int = 1
    save_freq: int = 100
    seed: int = 1
    loss: str = "mse"
    patience: int = None
    seeds: int = 1
    precision: str = "fp32"
    model: str = families.DEFAULT_MODEL
    model_options: dict = None  # the family's constructor options; None: fine-tuning
    ema: float = None
    swa_start: int = None
    average_last: int = None

    @classmethod
    def from_args(cls, args):
        """From parsed flags; a script without some flag keeps that default, and one
        without --model (personalize.py fine-tunes init.save's model) has no
        model options."""
        settings = {name: getattr(args, name) for name in cls.__dataclass_fields__
                    if hasattr(args, name) and name != "model_options"}
        if hasattr(args, "model"):
            settings["model_options"] = families.options_from_args(args.model, args)
        return cls(**settings)

    def check(self):
        for name in ("epochs", "batch_size", "split", "eval_freq", "save_freq", "seeds"):
            if getattr(self, name) < 1:
                raise ToolkitError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.patience is not None and self.patience < 1:
            raise ToolkitError(f"--patience must be at least 1, got {self.patience}")
        # The optimizer holds them as float32: a larger value overflows in its first step.
        if not 0 < self.lr <= FLOAT32_MAX:
            raise ToolkitError(f"--lr must be a positive number up to {FLOAT32_MAX:.3g} "
                               f"(float32), got {self.lr}")
        if not 0 <= self.weight_decay <= FLOAT32_MAX:
            raise ToolkitError(f"--weight_decay must be a number >= 0 up to {FLOAT32_MAX:.3g} "
                               f"(float32), got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ToolkitError(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                               f"{self.lr_schedule}")
        highest = 2 ** 32 - self.seeds  # every seed of --seeds in NumPy's range
        if not 0 <= self.seed <= highest:
            raise ToolkitError(f"--seed must be from 0 to {highest}, got {self.seed}")
        if self.loss not in utils.LOSSES:
            raise ToolkitError(f"--loss must be one of {', '.join(utils.LOSSES)}, got {self.loss}")
        self.check_averaging()
        families.family(self.model)
        if self.model_options is not None:
            families.check_options(self.model, self.model_options)

    def check_averaging(self):
        """--ema, --swa_start and --average_last, against each other and --epochs."""
        if self.ema is not None and not 0 <= self.ema < 1:  # NaN fails too
            raise ToolkitError(f"--ema must be at least 0 and below 1 (e.g. 0.99), got {self.ema}")
        if self.ema is not None and self.swa_start is not None:
            raise ToolkitError("--ema and --swa_start are two ways of averaging the weights: "
                               "give one")
        for flag, value in (("--swa_start", self.swa_start), ("--average_last", self.average_last)):
            if value is not None and not 1 <= value <= self.epochs:
                raise ToolkitError(f"{flag} must be from 1 to --epochs ({self.epochs}), got {value}")
        if self.average_last is not None and self.patience is not None:
            raise ToolkitError("--average_last averages the last epochs of --epochs, which "
                               "--patience may never reach: give one of them")

    def epoch_lr(self, epoch):
        """The learning rate of epoch `epoch` (from 1). A function of the epoch alone,
        so that --resume goes on with exactly the rates of an uninterrupted run."""
        if self.lr_schedule == "cosine":
            return self.lr * (1 + math.cos(math.pi * (epoch - 1) / self.epochs)) / 2
        return self.lr

    def new_model(self, input_dims, device):
        """A freshly initialized model of the --model family and sizes."""
        from . import models
        return models.create(self.model, input_dims, **self.model_options).to(device)

    def seed_runs(self, model_dir):
        """(settings of one seed, its folder) per seed: the folder itself for one
        seed, seed_<s>/ inside it for several."""
        if self.seeds == 1:
            return [(self, Path(model_dir))]
        return [(replace(self, seed=seed), layout.seed_dir(model_dir, seed))
                for seed in range(self.seed, self.seed + self.seeds)]


@dataclass(frozen=True)
class RunOptions:
    """What the training tasks of one command share besides the hyper-parameters
    (crossval.py's folds, personalize.py's subjects): `resumes` maps a run folder to
    whether it continues from its last.save; `progress` shows per-epoch bars."""
    settings: TrainingSettings
    normalize: bool = False
    cuda: bool = False
    postprocessing_flags: dict = None
    tensorboard_dir: Path = None
    resumes: dict = None
    progress: bool = True

    @classmethod
    def from_args(cls, args, settings=None, resumes=None, runner=None):
        """From parsed flags (`settings` defaults to theirs), with paths as the tasks of
        `runner` (parallel.Runner; default: here, one after another) get them."""
        runner = runner or parallel.Runner()
        run = cls(settings or TrainingSettings.from_args(args), args.normalize, args.cuda,
                  postprocessing.flags_given(args), runner.path(getattr(args, "tensorboard", None)),
                  progress=runner.in_this_process)
        return run.resuming(resumes or {}, runner)

    def resuming(self, resumes, runner=None):
        """These options with `resumes` ({run folder: whether it continues from its
        last.save}), the folders as the tasks of `runner` get them."""
        path = runner.path if runner is not None else Path
        return replace(self, resumes={path(folder): resume for folder, resume in resumes.items()})

    @property
    def postprocessing(self):
        return Postprocessing.resolve(**(self.postprocessing_flags or {}))

    @property
    def device(self):
        return precision.get_device(self.cuda)

    def check_trainable(self, train_set, postprocessing=None):
        """Refuse, before anything is written, a --split or --label_delay (that of
        `postprocessing`, else the flags') that some training video is too short for
        (fit would stop on it after args.json)."""
        delay_frames = (postprocessing or self.postprocessing).delay_frames
        delayed = train_set.with_label_delay(delay_frames) if delay_frames else train_set
        delayed.training_segments(self.settings.split)

    def resumes_run(self, folder):
        return (self.resumes or {}).get(folder, False)

    def resumed_runs(self, run_dir):
        """(folder, its seed's settings) of the runs under `run_dir` that --resume continues."""
        return [(folder, settings) for settings, folder in self.settings.seed_runs(run_dir)
                if self.resumes_run(folder)]


# ---------------------------------------------------------------- the check before writing

@dataclass
class Plan:
    """What a command is about to do, for `check_before_writing`.

    `outputs`: (folder, flag) of every folder it will write into. `options`: the run's
    RunOptions (training settings, normalization, device, post-processing flags).
    `data`: the videos it trains or evaluates on (their modalities and dimensions
    must fit every checkpoint); `trains` whether it trains on them (so each must
    fit --split and --label_delay). `base`: the checkpoint that fine-tuning starts
    from (its post-processing and normalization carry over to the runs). `resumed`:
    (folder, its seed's settings) of the runs that --resume continues. `evaluated`:
    checkpoints it will load for `data`. `runner`: where tasks run. `split_dirs`:
    (--train_dir, --test_dir) of a command that trains on the first and validates or
    tests on the second (they must be two folders). `base_checks`: functions of
    (the base model's network, its path) that refuse a base unfit for the command
    (personalize.py's methods, see finetuning.base_check).
    """
    outputs: list
    options: "RunOptions"
    data: datasets.VideoSet = None
    trains: bool = False
    base: Path = None
    resumed: list = field(default_factory=list)
    evaluated: list = field(default_factory=list)
    runner: parallel.Runner = None
    split_dirs: tuple = None
    base_checks: list = field(default_factory=list)


def check_before_writing(plan):
    """Every check of a command that must pass before its first write, in one order:
    the flags, where tasks run, the data against the flags, every checkpoint to be
    started from, resumed or evaluated against the data and flags, then the output
    folders (only these checks create a folder). Then notes on what the run will do
    that is legitimate but surprising."""
    from . import checkpoints
    run = plan.options
    flags = run.postprocessing_flags or {}
    run.settings.check()
    precision.check_precision(run.settings.precision, run.device)
    trained_with, normalize = run.postprocessing, run.normalize  # refuses bad flags
    check_tensorboard_dir(run.tensorboard_dir)
    if plan.runner is not None:
        plan.runner.check()
    if plan.trains and plan.split_dirs:
        check_separate_splits(*plan.split_dirs)
    if plan.base is not None:  # fine-tuning: what the base model was trained with carries over
        base = checkpoints.load_trained([plan.base], plan.data, run.normalize, "cpu")[0]
        trained_with = Postprocessing.resolve(base.checkpoint.get("postprocessing"), plan.base,
                                              **flags)
        normalize = base.scaler is not None
        for check in plan.base_checks:
            check(base.network, plan.base)
    if plan.trains:
        check_trainable_with(run, plan, trained_with, flags)
    for folder, settings in plan.resumed:
        checkpoints.check_resumable(folder, settings, plan.data.mods, plan.data.input_dims,
                                    normalize, trained_with)
    evaluated_with = []
    for path in plan.evaluated:
        saved = checkpoints.load_trained([path], plan.data, run.normalize, "cpu")[0]
        checkpoints.check_evaluated_model(path, saved.network.config, run.settings)
        evaluated_with.append(Postprocessing.resolve(saved.checkpoint.get("postprocessing"),
                                                     path, **flags))
    for folder, flag in plan.outputs:
        layout.check_output_folder(folder, flag)
    folders = [folder for folder in [*(folder for folder, _ in plan.outputs),
                                     run.tensorboard_dir] if folder]
    for folder in folders:  # all of them before any is made: a refusal leaves none behind
        utils.check_writable(folder, create=False)
    for folder in folders:
        utils.check_writable(folder)
    report_flat_annotations(plan, trained_with, evaluated_with)


def check_trainable_with(run, plan, trained_with, flags):
    """`RunOptions.check_trainable`; a label delay that fine-tuning takes from the
    base checkpoint, not from --label_delay, is named as the checkpoint's."""
    try:
        run.check_trainable(plan.data, trained_with)
    except ToolkitError as error:
        if plan.base is None or flags.get("label_delay") is not None or \
                not trained_with.label_delay:
            raise
        raise ToolkitError(f"{plan.base} was trained with --label_delay "
                           f"{trained_with.label_delay:g}, which fine-tuning keeps: {error} "
                           "(--label_delay replaces it)") from None


def check_separate_splits(train_dir, test_dir):
    """Training validates on --test_dir: the same folder as --train_dir (by any path
    or link) would score the model on its own training videos."""
    try:
        same = os.path.samefile(train_dir, test_dir)
    except OSError:  # one does not exist: loading the data says so
        same = Path(train_dir).resolve() == Path(test_dir).resolve()
    if same:
        raise ToolkitError(f"--test_dir {test_dir} is the same folder as --train_dir {train_dir}: "
                           "the model would be validated on its own training videos; give "
                           "the validation split, e.g. --test_dir data/Validation")


def report_flat_annotations(plan, trained_with, evaluated_with):
    """A warning when every training annotation is constant (e.g. a test split's dummy
    values: nothing to learn), and a note naming the listeners whose training
    annotations are constant when --calibrate would make their predictions that
    constant."""
    flat = set()
    if plan.trains:
        if all(np.ptp(video.annotation) == 0 for video in plan.data.videos):
            print("warning: every training annotation is constant (as a test split's dummy "
                  "values are): the model learns no change of valence over time, and scores "
                  "CCC 0; train on annotated videos", file=sys.stderr)
        if trained_with.calibrate:
            flat |= postprocessing.constant_listeners(
                postprocessing.listener_statistics(plan.data.videos))
    for saved in evaluated_with:
        flat |= postprocessing.flattened_listeners(saved)
    postprocessing.report_constant_listeners(flat)


def check_tensorboard_dir(tensorboard_dir):
    """--tensorboard must name a folder outside the data (and, checked with the output
    folders, one that can be written), checked before training."""
    if tensorboard_dir:
        layout.check_output_folder(tensorboard_dir, "--tensorboard")
        if Path(tensorboard_dir).exists() and not Path(tensorboard_dir).is_dir():
            raise ToolkitError(f"--tensorboard {tensorboard_dir} is a file: give a folder for the "
                               "event files, e.g. tb")
