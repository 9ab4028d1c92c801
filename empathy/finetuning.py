"""How personalize.py fine-tunes a shared model for one listener: the methods
(`--finetune all|head|adapter`, `--anchor`, `--mix`), their flags and checks, what
the training engine needs of them, and `--inner_cv`'s choice among them
(`choose_method`).

With four or five stories per listener, updating every weight memorizes them. The
methods update fewer weights, pull them toward the shared model, or dilute the
listener's videos with other listeners':

- `all` (the default): every weight, as the guide does.
- `head`: only the model family's output layers (`models.<family>.HEAD`: the
  attention and the decoder of lstm and gru, the decoder of tcn and transformer);
  the encoder stays bit-identical.
- `adapter`: the network is frozen; a `models.ListenerAdapter` (a rank-1 residual
  on the decoder's 128-d features and a gain and shift of the output, 258
  parameters with the default sizes) is learnt, and saved in the checkpoint's
  configuration, so every script that loads the model rebuilds it. Adam moves
  each weight by about --lr a step, and a listener's videos fill about one batch
  an epoch: at --lr 1e-4, 10 epochs move the adapter by about 0.001, so it is
  given 1e-3 to 1e-2 to learn (the same --lr, as the network is frozen). With
  --calibrate its gain and shift are undone (each video's prediction is
  standardized), and only the residual acts.
- `--anchor WEIGHT` (all, head): L2-SP (Li et al. 2018): WEIGHT x the sum of
  squared differences between the trainable weights and init.save's is added to
  the loss, in place of Adam's weight decay toward zero (--weight_decay).
- `--mix FRACTION`: each batch holds round(FRACTION x --batch_size) pieces of other
  listeners' training videos and the rest of the listener's own; an epoch is one
  pass over the listener's own pieces. `--augment N` is the older, coarser way to
  the same end: it trains on every video with the listener's repeated N times, so
  the listener's share of an epoch is N n / (N n + others) on average, and an
  epoch also passes over every other video; --mix fixes the share per batch and
  keeps epochs as short as without it. The two do not combine.
- `--mix_weighting similar` (with --mix): the other listeners' pieces are drawn with
  probabilities in proportion to how alike the listeners respond
  (`listener_similarity`: the mean correlation of their annotations on the stories both
  heard, below zero counted as zero), instead of uniformly (the idea of Distance
  Weighting Augmentation, arXiv 2404.09042). Only the fold's training videos are
  compared, so an inner fold never looks at its held-out story.

- `--ema DECAY` / `--swa_start EPOCH`: the weights averaged as in train.py; `none`
  is a value, so that `--inner_cv` can choose with or without (`Method.settings`).

Each flag takes several values for `--inner_cv`, which tries every combination
(an adapter takes no anchor: it is tried without one) and keeps, per listener, the
combination and number of epochs (0: keep init.save) with the best held-out CCC.
Several values without `--inner_cv` are refused, as is an anchor with adapter alone.

An inner fold holds out one of the listener's training stories. init.save was trained
on that story, so fine-tuning it scores far better on it than on a new story, and every
method looks better than it is. `--inner_init CV_DIR` starts the fold that holds out
story s from CV_DIR/val_on_<s>/last.save instead (a crossval.py run over the training
stories: a model that never saw s; its last epoch, as best.save was picked on s). A
finished inner fold keeps its metrics and a record of how it was trained
(`inner_fold.json`) but no weights, unless `--keep_inner_weights`; --resume skips it.
"""
import argparse
import itertools
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from . import families, layout, tables, utils
from .utils import ToolkitError

# imported on first use, so that personalize.py's --help and flag checks load no torch

FINETUNE_METHODS = ("all", "head", "adapter")
MIX_WEIGHTINGS = ("uniform", "similar")
ADAPTER_RANK = 1  # 2 x 128 + 2 = 258 parameters with the default decoder
KEPT_INIT = "none"  # the method column of a listener for whom init.save was kept
INNER_FOLD_RECORD = "inner_fold.json"  # how a finished inner fold was trained (its weights gone)


def get_args_parser():
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("fine-tuning method (several values: --inner_cv chooses)")
    group.add_argument("--finetune", nargs="+", choices=FINETUNE_METHODS, default=["all"],
                       metavar="METHOD",
                       help="all: every weight; head: only the output layers (attention and "
                            "decoder), the encoder frozen; adapter: the network frozen, a "
                            "listener adapter of a few hundred parameters learnt "
                            "(default: all)")
    group.add_argument("--anchor", nargs="+", default=["0"], metavar="WEIGHT",
                       help="with all or head: add WEIGHT x the squared distance of the weights "
                            "from init.save's to the loss (L2-SP), instead of the weight decay "
                            "toward zero; 0: off (default: 0)")
    group.add_argument("--mix", nargs="+", default=["0"], metavar="FRACTION",
                       help="draw this fraction of each batch from the other listeners' "
                            "training videos, 0 to 1 (default: 0)")
    group.add_argument("--mix_weighting", nargs="+", choices=MIX_WEIGHTINGS, default=["uniform"],
                       metavar="WEIGHTING",
                       help="with --mix: draw every other listener's pieces alike (uniform), or "
                            "in proportion to how their annotations correlate with the "
                            "listener's on the stories both heard (similar) "
                            "(default: uniform)")
    # personalize.py's --ema and --swa_start (the training flags' single values, here
    # several for --inner_cv to choose among, "none" among them); see `averagings`.
    group.add_argument("--ema", nargs="+", metavar="DECAY",
                       help="validate, save and predict with an exponential moving average of "
                            "the weights (as in train.py), DECAY in [0, 1); several values "
                            "(none: no averaging) for --inner_cv to choose among "
                            "(default: off)")
    group.add_argument("--swa_start", nargs="+", metavar="EPOCH",
                       help="stochastic weight averaging from epoch EPOCH on (as in train.py); "
                            "several values (none: no averaging) for --inner_cv to choose "
                            "among; a listener fine-tuned for fewer epochs gets none "
                            "(default: off)")
    group = parser.add_argument_group("inner cross-validation")
    group.add_argument("--inner_cv", action="store_true",
                       help="choose each subject's number of fine-tuning epochs (0 to "
                            "--epochs), and method where --finetune, --anchor or --mix give "
                            "several, by leave-one-story-out over their own training videos")
    group.add_argument("--inner_init", metavar="CV_DIR",
                       help="with --inner_cv: the inner fold that holds out story s starts from "
                            "CV_DIR/val_on_<s>/last.save (crossval.py over the training "
                            "stories: a model that never saw s) instead of init.save, which "
                            "was trained on s (default: init.save)")
    group.add_argument("--keep_inner_weights", action="store_true",
                       help="with --inner_cv: keep the checkpoints of finished inner folds "
                            "(default: only their metrics.csv and inner_fold.json)")
    return parser


@dataclass(frozen=True)
class Method:
    """One way of fine-tuning: which weights learn, the pull toward init.save, and
    the share of other listeners' videos in a batch."""
    finetune: str = "all"
    anchor: float = 0.0
    mix: float = 0.0
    weighting: str = "uniform"  # of the other listeners' pieces that --mix draws
    ema: float = None  # the averaging of the weights (--ema DECAY or --swa_start EPOCH)
    swa_start: int = None

    @property
    def name(self):
        """e.g. all, head_anchor0.01, adapter_mix0.5, all_mix0.5_similar, all_swa1:
        folders and tables."""
        return (self.finetune + (f"_anchor{self.anchor:g}" if self.anchor else "")
                + (f"_mix{self.mix:g}" if self.mix else "")
                + (f"_{self.weighting}" if self.weighting != "uniform" else "")
                + (f"_ema{self.ema:g}" if self.ema is not None else "")
                + (f"_swa{self.swa_start}" if self.swa_start is not None else ""))

    @property
    def record(self):
        return asdict(self)

    def settings(self, settings):
        """The training settings (options.TrainingSettings) of a run of this method: its
        averaging; SWA only where the run reaches its first epoch (an inner fold's epoch
        e before it is the trained weights, so a listener fine-tuned for e epochs gets
        none)."""
        swa_start = self.swa_start if (self.swa_start or 0) <= settings.epochs else None
        return replace(settings, ema=self.ema, swa_start=swa_start)

    @classmethod
    def from_row(cls, row):
        """The method of an inner_cv.csv row (pandas gives NaN for None)."""
        def given(name, kind):
            value = row.get(name)
            return None if value is None or pd.isna(value) else kind(value)
        return cls(row["finetune"], float(row["anchor"]), float(row["mix"]),
                   row.get("weighting", "uniform"), given("ema", float), given("swa_start", int))


DEFAULT = Method()
AVERAGING_FIELDS = ("ema", "swa_start")


def table_record(method, methods):
    """What personalize.csv says of the method a subject got: its record, without the
    averaging columns where none of `methods` averages the weights."""
    record = method.record
    if all(getattr(candidate, name) is None for candidate in methods
           for name in AVERAGING_FIELDS):
        record = {name: value for name, value in record.items() if name not in AVERAGING_FIELDS}
    return record


def _numbers(values, flag):
    """The flag's values as numbers, each once, in the order given."""
    numbers = []
    for value in values:
        try:
            number = float(value)
        except ValueError:
            raise ToolkitError(f"{flag} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ToolkitError(f"{flag} must be a finite number, got {value}")
        numbers.append(number)
    return list(dict.fromkeys(numbers))


def methods_from_args(args):
    """The methods the flags ask for, checked (one error line for bad values): one,
    or several for --inner_cv to choose among."""
    anchors, mixes = _numbers(args.anchor, "--anchor"), _numbers(args.mix, "--mix")
    for anchor in anchors:
        if anchor < 0:
            raise ToolkitError(f"--anchor must be 0 or more (the weight of the pull toward "
                               f"init.save), got {anchor:g}")
    for mix in mixes:
        if not 0 <= mix <= 1:
            raise ToolkitError(f"--mix must be a fraction from 0 to 1, got {mix:g}")
    if any(mixes) and getattr(args, "augment", None):
        raise ToolkitError("--mix and --augment both add other listeners' videos: give one")
    weightings = list(dict.fromkeys(args.mix_weighting))
    if weightings != ["uniform"] and not any(mixes):
        raise ToolkitError("--mix_weighting weights the other listeners' pieces that --mix "
                           "draws: give --mix too, e.g. --mix 0.5")
    # Without other listeners' pieces (mix 0) there is nothing to weight.
    combinations = [Method(finetune, anchor, mix, weighting if mix else "uniform", **averaging)
                    for finetune, anchor, mix, weighting, averaging
                    in itertools.product(dict.fromkeys(args.finetune), anchors, mixes, weightings,
                                         averagings(args))]
    if any(anchors) and set(args.finetune) == {"adapter"}:
        raise ToolkitError(f"--anchor {max(anchors):g} pulls the weights that fine-tuning "
                           "updates toward init.save's: it applies to --finetune all and head, "
                           "not adapter")
    # With all or head beside adapter, an adapter is tried without an anchor.
    methods = list(dict.fromkeys(replace(method, anchor=0.0) if method.finetune == "adapter"
                                 else method for method in combinations))
    if len(methods) > 1 and not args.inner_cv:
        names = ", ".join(method.name for method in methods)
        raise ToolkitError(f"{len(methods)} fine-tuning methods ({names}): give one value per "
                           "--finetune, --anchor, --mix, --mix_weighting, --ema and --swa_start, "
                           "or add --inner_cv to choose among them per subject")
    return methods


def averagings(args):
    """The averagings of the weights that --ema and --swa_start ask for, each as
    Method fields ({"ema": DECAY} or {"swa_start": EPOCH}; {} for none), checked: one
    error line for a bad value. Their range against --epochs is checked with the
    run's settings (`Method.settings`, options.TrainingSettings.check)."""
    emas = _averaging_values(args.ema, "--ema", float)
    swa_starts = _averaging_values(args.swa_start, "--swa_start", int)
    if any(value is not None for value in emas) and any(value is not None for value in swa_starts):
        raise ToolkitError("--ema and --swa_start are two ways of averaging the weights: give "
                           "one (with --inner_cv, several values of it, none among them)")
    if any(value is not None for value in swa_starts):
        return [{"swa_start": value} for value in swa_starts]
    return [{"ema": value} for value in emas]


def _averaging_values(values, flag, kind):
    """--ema's or --swa_start's values (None for "none"), each once, in the order given."""
    parsed = []
    for value in values or ["none"]:
        if str(value).lower() == "none":
            parsed.append(None)
            continue
        try:
            number = kind(value)
        except ValueError:
            what = "a number" if kind is float else "a whole number"
            raise ToolkitError(f"{flag} must be {what} or none, got {value!r}") from None
        if kind is float and not math.isfinite(number):
            raise ToolkitError(f"{flag} must be a finite number, got {value}")
        parsed.append(number)
    return list(dict.fromkeys(parsed))


def check_method_settings(methods, settings):
    """Each method's averaging against --epochs and the other flags, before any write."""
    for method in methods:
        replace(settings, ema=method.ema, swa_start=method.swa_start).check()


# ---------------------------------------------------------------- the model

def base_check(methods):
    """A check of the model to fine-tune (options.Plan.base_checks): it has the
    layers that each method needs."""
    import torch
    def check(network, path):
        for method in methods:
            if method.finetune == "head":
                missing = [name for name in type(network).HEAD if not hasattr(network, name)]
                if not type(network).HEAD or missing:
                    raise ToolkitError(f"--finetune head: {path} has no output layers to "
                                       "fine-tune alone (its model family names no head): "
                                       "use --finetune all or adapter")
            if method.finetune == "adapter":
                decoder = getattr(network, "dec_target", None)
                if not (isinstance(decoder, torch.nn.Sequential) and len(decoder) == 3
                        and all(isinstance(decoder[i], torch.nn.Linear) for i in (0, 2))):
                    raise ToolkitError(f"--finetune adapter: {path} has no decoder (linear, "
                                       "ReLU, linear) for a listener adapter to correct: use "
                                       "--finetune all or head")
                if "adapter" in network._modules:
                    raise ToolkitError(f"--finetune adapter: {path} already holds a listener "
                                       "adapter (a personalized model): start from the shared "
                                       "model that was personalized")
    return check


def prepare(network, method):
    """`network` (init.save's model) made ready for `method`: the weights that must
    not learn are frozen, and an adapter is added where asked for."""
    if method.finetune == "all":
        return network
    network.requires_grad_(False)
    if method.finetune == "head":
        for name in type(network).HEAD:
            getattr(network, name).requires_grad_(True)
        return network
    device = next(network.parameters()).device
    return network.add_adapter(ADAPTER_RANK).to(device)


class SubjectFineTuning:
    """What the training engine (engine.Training's `finetuning`) needs of one method for
    one subject: the weight decay, the penalty added to the loss (None: none), the
    batches of an epoch, and the record kept in every checkpoint."""

    def __init__(self, method, subject, settings, init_weights):
        self.method, self.subject, self.settings = method, subject, settings
        self.weight_decay = 0.0 if method.anchor else settings.weight_decay  # L2-SP replaces it
        self.penalty = self._anchor_penalty if method.anchor else None
        # init.save's weights, which --anchor pulls toward
        self.init_weights = ({name: value.detach().clone() for name, value in init_weights.items()}
                             if method.anchor else None)

    @property
    def record(self):
        return self.method.record

    def _anchor_penalty(self, model):
        distance = sum(((parameter - self.init_weights[name]) ** 2).sum()
                       for name, parameter in model.named_parameters()
                       if parameter.requires_grad and name in self.init_weights)
        return self.method.anchor * distance

    def batches(self, train_set):
        """A function of the shuffling generator that draws an epoch's batches (None:
        the engine's own, every piece once)."""
        if not self.method.mix:
            return None
        weights = (listener_similarity(train_set, self.subject)
                   if self.method.weighting == "similar" else None)
        return MixedBatches(train_set, self.subject, self.method.mix, self.settings.split,
                            self.settings.batch_size, weights)


class MixedBatches:
    """An epoch's batches for --mix: the subject's own training pieces once, in a
    random order, `batch_size - k` to a batch, each batch completed with k =
    round(mix x batch_size) pieces of other listeners' videos (a last, shorter
    batch with as many in proportion), drawn without repeats until all were drawn.
    With mix 1 a batch holds others' pieces only, as many batches as the subject's
    pieces fill. With `weights` ({listener: weight}, --mix_weighting similar) the
    others' pieces are drawn with replacement instead, a piece of listener j with
    probability in proportion to weights[j]."""

    def __init__(self, train_set, subject, mix, split, batch_size, weights=None):
        own = train_set.select(subjects=[subject])
        others = train_set.subset([video for video in train_set.videos
                                   if video.subject != subject])
        self.own = own.training_segments(split)
        self.others = others.training_segments(split)
        # training_segments cuts each video into `split` pieces, in the order of the videos
        self.piece_weights = None if weights is None else [
            weights[video.subject] for video in others.videos for _ in range(split)]
        self.batch_size = batch_size
        self.others_per_batch = round(mix * batch_size) if self.others else 0
        self.own_per_batch = batch_size - self.others_per_batch

    def __call__(self, generator):
        import torch
        own = [self.own[i] for i in torch.randperm(len(self.own), generator=generator).tolist()]
        if self.own_per_batch:
            chunks = [own[start:start + self.own_per_batch]
                      for start in range(0, len(own), self.own_per_batch)]
            counts = [round(len(chunk) * self.others_per_batch / self.own_per_batch)
                      for chunk in chunks]
        else:
            chunks = [[] for _ in range(math.ceil(len(own) / self.batch_size))]
            counts = [self.others_per_batch] * len(chunks)
        drawn = self._draw_others(sum(counts), generator)
        batches, used = [], 0
        for chunk, count in zip(chunks, counts):
            batches.append(chunk + drawn[used:used + count])
            used += count
        return batches

    def _draw_others(self, count, generator):
        import torch
        if self.piece_weights is not None:
            if not count:
                return []
            chosen = torch.multinomial(torch.tensor(self.piece_weights, dtype=torch.float64),
                                       count, replacement=True, generator=generator)
            return [self.others[i] for i in chosen.tolist()]
        drawn = []
        while len(drawn) < count:
            drawn += [self.others[i] for i in
                      torch.randperm(len(self.others), generator=generator).tolist()]
        return drawn[:count]


def listener_similarity(train_set, subject):
    """{other listener: weight} for --mix_weighting similar: the mean, over the stories
    that both annotated in `train_set`, of the Pearson correlation of their 25 fps
    annotations (over the frames both have), a mean below zero counted as zero (a
    listener who shares no story weighs zero too); all alike where no listener
    correlates positively."""
    own = {video.story: video.annotation for video in train_set.videos
           if video.subject == subject}
    heard = {}
    for video in train_set.videos:
        if video.subject != subject and video.story in own:
            length = min(len(video.annotation), len(own[video.story]))
            with np.errstate(invalid="ignore", divide="ignore"):  # a flat annotation: NaN, 0
                pair = np.corrcoef(own[video.story][:length], video.annotation[:length])[0, 1]
            heard.setdefault(video.subject, []).append(0.0 if np.isnan(pair) else pair)
    others = sorted({video.subject for video in train_set.videos} - {subject})
    weights = {other: max(float(np.mean(heard[other])), 0.0) if other in heard else 0.0
               for other in others}
    if not any(weights.values()):
        return dict.fromkeys(others, 1.0)
    return weights


def check_weighting(methods, train_all):
    """--mix_weighting similar compares the listener with two or more others."""
    if any(method.weighting == "similar" for method in methods) and len(train_all.subjects) < 3:
        raise ToolkitError(f"--mix_weighting similar weighs the other listeners by how alike they "
                           f"respond, and the training videos have {len(train_all.subjects)} "
                           "listener(s): it needs three or more; use --mix_weighting uniform")


def training_videos(train_all, subject, method, augment=None):
    """The videos a subject's model is fine-tuned on: their own; with --mix every
    listener's (the batches pick); with --augment N every video, theirs N times."""
    if method.mix:
        return train_all
    if augment:
        return train_all.repeat_subjects([subject], augment)
    return train_all.select(subjects=[subject])


# ---------------------------------------------------------------- --inner_cv's choice

@dataclass(frozen=True)
class InnerCV:
    """How --inner_cv runs its folds: `starts` ({story: checkpoint} from --inner_init;
    empty: every fold starts from init.save) and `init_dir` (--inner_init's folder,
    resolved, as inner_fold.json records it); whether finished folds keep their
    weights; and whether --resume was given (it skips the folds that finished)."""
    starts: dict = None
    init_dir: str = None
    keep_weights: bool = False
    resume: bool = False


class SubjectTuning:
    """What every fine-tuning run of one subject starts from: init.save (a fresh copy
    per run), or for an inner fold, --inner_init's model of that fold (`starts`,
    {story: checkpoint}); their weights (which --anchor pulls toward), the videos
    (scaled as the starting model scales them) and the post-processing."""

    def __init__(self, train_all, subject, init, run, postprocessing, augment, starts=None):
        self.train_all, self.subject, self.init, self.run = train_all, subject, init, run
        self.postprocessing, self.augment = postprocessing, augment
        self.starts = dict(starts or {})
        self._start_models = {None: init}

    def start(self, story=None):
        """The model that the inner fold holding out `story` starts from (None: the
        subject's own run, which starts from init.save), loaded once."""
        from . import checkpoints
        key = story if story in self.starts else None
        if key not in self._start_models:
            self._start_models[key] = checkpoints.load_trained(
                [self.starts[key]], self.train_all, self.run.normalize, self.run.device)[0]
        return self._start_models[key]

    def model(self, method, story=None):
        """A fresh copy of the starting model, made ready for `method`. Read from the file
        again rather than copied: building it draws from the just-seeded random
        generator, as it always has, so the dropout masks, and with them the numbers,
        stay those of earlier versions (tests/test_unchanged.py)."""
        from . import checkpoints
        network = checkpoints.load_trained([self.start(story).path], self.train_all,
                                           self.run.normalize, self.run.device)[0].network
        return prepare(network, method)

    def own_videos(self, story=None):
        """The subject's training videos, scaled as the starting model scales them."""
        return self.train_all.with_scaler(self.start(story).scaler).select(subjects=[self.subject])

    def videos(self, method, story=None):
        return training_videos(self.train_all.with_scaler(self.start(story).scaler), self.subject,
                               method, self.augment)

    def finetuning(self, method, settings, story=None):
        return SubjectFineTuning(method, self.subject, settings,
                                 dict(self.start(story).network.named_parameters()))


@dataclass(frozen=True)
class Choice:
    """--inner_cv's choice for one subject: the method, the number of epochs (0 keeps
    init.save) and the gain in mean held-out CCC it promises over epoch 0."""
    method: Method
    epochs: int
    estimated_gain: float


def choose_method(tuning, methods, subject_folder, inner=InnerCV()):
    """The method of `methods` and number of fine-tuning epochs (0 to --epochs; 0
    keeps init.save) with the best mean CCC on the subject's own training stories,
    each held out in turn (its starting model, init.save or --inner_init's fold,
    fine-tuned on the others and scored every --eval_freq epochs); writes the curves
    to <subject_folder>/inner_cv.csv and returns a Choice."""
    from . import engine
    run = tuning.run
    stories = tuning.own_videos().stories
    settings = run.settings
    several = len(methods) > 1
    held_out = {story: tuning.own_videos(story).select(stories=[story]) for story in stories}
    # Epoch 0 calibrates (--calibrate) as engine.fit does the fold's fine-tuned model,
    # with the statistics of the other stories: init.save's own include the held-out one.
    start = {layout.fold_name(story): engine.evaluate(
        tuning.start(story).network, videos, run.device,
        tuning.postprocessing.with_listener_stats(
            tuning.own_videos(story).select(exclude_stories=[story]).videos),
        settings.precision)["ccc"] for story, videos in held_out.items()}
    rows = [{**Method(KEPT_INIT).record, "epoch": 0, **start}]
    for method in methods:
        curves = {}
        for story in stories:
            folder = inner_fold_dir(subject_folder, story, method, several)
            if not (inner.resume and finished_inner_fold(folder)):
                fit_inner_fold(tuning, method, story, method.settings(inner_settings(settings)),
                               held_out[story], folder,
                               inner_fold_record(method, settings, inner.init_dir),
                               inner.keep_weights)
            history = pd.read_csv(folder / layout.METRICS).dropna(subset=["val_ccc"])
            curves[layout.fold_name(story)] = history.set_index("epoch")["val_ccc"]
        rows += [{**method.record, "epoch": epoch, **scores}
                 for epoch, scores in pd.DataFrame(curves).iterrows()]
    table = pd.DataFrame(rows)
    table["mean_ccc"] = tables.spread(table[list(start)], axis=1, skipna=True).mean
    if not several:  # one method: the curves of its epochs alone
        table = table.drop(columns=list(DEFAULT.record))
    utils.write_csv(table, Path(subject_folder) / layout.INNER_CV_TABLE)
    best = table.loc[table["mean_ccc"].idxmax()]  # the first best: ties keep init.save
    method = Method.from_row(best) if several else methods[0]
    return Choice(method, int(best["epoch"]), float(best["mean_ccc"] - table["mean_ccc"].iloc[0]))


def fit_inner_fold(tuning, method, story, settings, held_out, folder, record, keep_weights):
    """Fine-tune the fold's starting model on the subject's other stories, scoring
    `held_out` every --eval_freq epochs; then record how (`record`, inner_fold.json)
    and, unless `keep_weights`, delete its checkpoints: only the curve is needed."""
    from . import engine
    run = tuning.run
    (Path(folder) / INNER_FOLD_RECORD).unlink(missing_ok=True)  # redone: no longer finished
    engine.seed_everything(settings.seed)
    engine.fit(tuning.model(method, story),
               engine.Training(tuning.videos(method, story).select(exclude_stories=[story]),
                               settings, run.device, tuning.finetuning(method, settings, story)),
               engine.Validation(held_out, tuning.postprocessing), folder,
               engine.Hooks.of(run), resume=run.resumes_run(folder))
    utils.write_json(record, Path(folder) / INNER_FOLD_RECORD)
    if not keep_weights:  # after the record: a fold killed in between still resumes
        for path in Path(folder).glob("*.save"):
            path.unlink()


def inner_settings(settings):
    """An inner fold's training settings: one seed, every epoch to the end, one save."""
    return replace(settings, seeds=1, patience=None, save_freq=settings.epochs)


def inner_fold_record(method, settings, init_dir):
    """What inner_fold.json records of a fold of `method` under the run's `settings`:
    enough for --resume to refuse other flags."""
    fold_settings = method.settings(inner_settings(settings))
    return {"finetuning": method.record, "training": asdict(fold_settings), "inner_init": init_dir}


def finished_inner_fold(folder):
    """Whether `folder` holds an inner fold that finished and kept no weights."""
    folder = Path(folder)
    return (folder / INNER_FOLD_RECORD).is_file() and not (folder / layout.LAST).is_file()


def inner_cv_folders(train_all, subject, out_dir, methods):
    """{folder: method} of a subject's inner cross-validation, which needs two or more
    of their training stories."""
    stories = train_all.select(subjects=[subject]).stories
    if len(stories) < 2:
        raise ToolkitError(f"--inner_cv needs two or more training stories of subject {subject}, "
                           f"who has {len(stories)}: leave out --inner_cv or that subject")
    subject_folder = layout.subject_dir(out_dir, subject)
    return {inner_fold_dir(subject_folder, story, method, len(methods) > 1): method
            for method in methods for story in stories}


# ---------------------------------------------------------------- folders and resuming

def inner_fold_dir(subject_folder, story, method, several):
    """A fold of the inner cross-validation: inner_val_on_<story>/ for one method,
    inner_<method>/val_on_<story>/ when --inner_cv compares several."""
    return layout.inner_fold_dir(subject_folder, story, method.name if several else None)


def saved_method(path):
    """The method a checkpoint was fine-tuned with (the default for one without a record)."""
    from . import checkpoints
    record = checkpoints.load_checkpoint(path).get("finetuning") or {}
    return Method(**{key: record[key] for key in DEFAULT.record if key in record})


def check_resumed(folder, method):
    """Refuse a --resume of a run in `folder` that was fine-tuned another way."""
    path = Path(folder) / layout.LAST
    saved = saved_method(path)
    if saved != method:
        raise ToolkitError(f"--resume: {path} was fine-tuned with {describe(saved)}, not "
                           f"{describe(method)}: resume with the run's own settings (its "
                           "args.json), or start afresh with --overwrite")


def describe(method):
    return (f"--finetune {method.finetune} --anchor {method.anchor:g} --mix {method.mix:g}"
            + (f" --mix_weighting {method.weighting}" if method.weighting != "uniform" else "")
            + (f" --ema {method.ema:g}" if method.ema is not None else "")
            + (f" --swa_start {method.swa_start}" if method.swa_start is not None else ""))


def check_resumed_methods(folders, inner, resumes, methods):
    """Refuse a --resume of runs fine-tuned another way than the flags say (a subject's
    own run is checked here where there is one method, else once it is chosen)."""
    for folder, method in inner.items():
        if resumes[folder]:
            check_resumed(folder, method)
    if len(methods) == 1:
        for folder in folders:
            if resumes[folder]:
                check_resumed(folder, methods[0])


def check_finished_folds(records, resumes=None):
    """Refuse to reuse (--resume) a finished inner fold whose inner_fold.json differs
    from what the flags ask (`records`: {folder: inner_fold_record})."""
    for folder, wanted in records.items():
        check_finished_fold(folder, wanted)


def check_finished_fold(folder, wanted):
    """Refuse to reuse a finished inner fold whose inner_fold.json differs from `wanted`."""
    path = Path(folder) / INNER_FOLD_RECORD
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ToolkitError(f"--resume: {path} cannot be read (damaged): start afresh with "
                           "--overwrite") from None
    for part in ("finetuning", "training"):
        for name, value in wanted[part].items():
            if saved.get(part, {}).get(name) != value:
                raise ToolkitError(f"--resume: {path} was fine-tuned with --{name} "
                                   f"{saved.get(part, {}).get(name)}, not {value}: resume with "
                                   "the run's own settings (its args.json), or start afresh "
                                   "with --overwrite")
    if saved.get("inner_init") != wanted["inner_init"]:
        raise ToolkitError(f"--resume: {path} started from --inner_init "
                           f"{saved.get('inner_init') or 'none (init.save)'}, not "
                           f"{wanted['inner_init'] or 'none (init.save)'}: resume with the "
                           "run's own settings (its args.json), or start afresh with --overwrite")


# ---------------------------------------------------------------- --inner_init

def inner_init_starts(cv_dir, stories, init_path):
    """--inner_init: {story: CV_DIR/val_on_<story>/last.save} for each of `stories`
    (the subjects' training stories), each checked against init.save (`init_path`):
    the same modalities, model family, normalization and label delay."""
    from . import checkpoints
    cv_dir = Path(cv_dir)
    advice = (f"cross-validate over the training stories first, e.g. python crossval.py "
              f"--stories {' '.join(map(str, stories))} --out_dir {cv_dir}")
    if not cv_dir.is_dir() or not layout.fold_stories(cv_dir):
        raise ToolkitError(f"--inner_init {cv_dir} is not a crossval.py output (no "
                           f"{layout.fold_name('<story>')}/ folders): {advice}")
    init = checkpoints.load_checkpoint(init_path)
    starts = {}
    for story in stories:
        paths = checkpoints.run_checkpoints(layout.fold_dir(cv_dir, story), layout.LAST)
        if len(paths) > 1:
            raise ToolkitError(f"--inner_init: {layout.fold_dir(cv_dir, story)} holds "
                               f"{len(paths)} seeds' models: give a crossval.py run of one seed")
        if not paths[0].is_file():
            raise ToolkitError(f"--inner_init: {paths[0]} does not exist: the inner fold that "
                               f"holds out story {story} starts from a model that never saw it; "
                               f"{advice}")
        fold = checkpoints.load_checkpoint(paths[0])
        planned = (fold.get("training") or {}).get("epochs", fold["epoch"])
        if fold["epoch"] < planned and not fold.get("stopped_early"):
            raise ToolkitError(f"--inner_init: {paths[0]} is at epoch {fold['epoch']} of "
                               f"{planned}: let that crossval.py run finish (--resume) first")
        _check_same_kind(paths[0], fold, init_path, init)
        starts[story] = paths[0]
    return starts


def _check_same_kind(path, fold, init_path, init):
    """A fold of --inner_init must be a model of init.save's kind."""
    config, init_config = fold.get("config") or {}, init.get("config") or {}
    kinds = [
        ("modalities (--mods)", ",".join(sorted(config.get("mods", []))),
         ",".join(sorted(init_config.get("mods", [])))),
        ("model family (--model)", config.get("family", families.DEFAULT_MODEL),
         init_config.get("family", families.DEFAULT_MODEL)),
        ("normalization (--normalize)", "on" if fold.get("normalization") else "off",
         "on" if init.get("normalization") else "off"),
        ("label delay (--label_delay)", (fold.get("postprocessing") or {}).get("label_delay", 0),
         (init.get("postprocessing") or {}).get("label_delay", 0)),
    ]
    for what, fold_value, init_value in kinds:
        if fold_value != init_value:
            raise ToolkitError(f"--inner_init: {path} has {what} {fold_value}, {init_path} has "
                               f"{init_value}: give a crossval.py run with init.save's settings")
