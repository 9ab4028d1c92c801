"""personalize.py's fine-tuning methods (issue 28): --finetune head and adapter,
--anchor, --mix, --inner_cv choosing among them, resuming, loading and bad input."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from empathy import checkpoints, datasets, engine, families, finetuning, models
import personalize
import train
from conftest import assert_same_checkpoints, run_in_process, write_tiny_data
from empathy.utils import ToolkitError

MODS = "audio,text"


def run(module, *argv):
    return module.main(module.get_args_parser().parse_args([str(arg) for arg in argv]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny data and a shared model (one epoch) to personalize, in a folder of its own."""
    root = tmp_path_factory.mktemp("methods")
    write_tiny_data(root / "data")
    run(train, *split(root), "--mods", MODS, "--epochs", 1, "--lr", 1e-3, "--model_dir",
        root / "shared", "--ledger", "none")
    return root


def split(root):
    return ["--train_dir", root / "data" / "Training", "--test_dir", root / "data" / "Validation"]


def personal_dir(workspace, name, init=None):
    folder = workspace / name
    folder.mkdir()
    shutil.copyfile(init or workspace / "shared" / "best.save", folder / "init.save")
    return folder


def personalize_run(workspace, folder, *argv):
    return run(personalize, *split(workspace), "--mods", MODS, "--out_dir", folder, "--lr", 1e-3,
               "--subjects", 1, *argv)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


HEAD_PREFIXES = ("attn.", "dec_target.")  # the lstm family's HEAD


# ---------------------------------------------------------------- head and adapter

def test_head_updates_only_the_output_layers(workspace):
    folder = personal_dir(workspace, "head")
    table = personalize_run(workspace, folder, "--finetune", "head", "--epochs", 2)
    init, tuned = weights(folder / "init.save"), weights(folder / "subject_1" / "last.save")
    assert tuned.keys() == init.keys()
    for name in init:
        if name.startswith(HEAD_PREFIXES):
            assert not torch.equal(tuned[name], init[name]), f"{name} did not learn"
        else:
            assert torch.equal(tuned[name], init[name]), f"{name} of the encoder changed"
    saved = torch.load(folder / "subject_1" / "last.save", weights_only=True)
    assert saved["finetuning"] == {"finetune": "head", "anchor": 0.0, "mix": 0.0,
                                   "weighting": "uniform", "ema": None, "swa_start": None}
    assert json.loads((folder / "args.json").read_text())["finetune"] == ["head"]
    assert table.loc[0, "finetune"] == "head"
    assert list(pd.read_csv(folder / "personalize.csv").columns) == [
        "subject", "before_ccc", "after_ccc", "finetune", "anchor", "mix", "weighting"]


def test_adapter_freezes_the_network_and_loads_everywhere(workspace):
    folder = personal_dir(workspace, "adapter")
    table = personalize_run(workspace, folder, "--finetune", "adapter", "--epochs", 2)
    init, tuned = weights(folder / "init.save"), weights(folder / "subject_1" / "last.save")
    for name in init:
        assert torch.equal(tuned[name], init[name]), f"{name} changed"
    adapter = {name: value for name, value in tuned.items() if name not in init}
    assert sorted(adapter) == ["adapter.down.weight", "adapter.gain", "adapter.shift",
                               "adapter.up.weight"]
    assert sum(value.numel() for value in adapter.values()) == 2 * 128 + 2
    assert torch.count_nonzero(adapter["adapter.up.weight"]) > 0  # it learnt
    assert table.loc[0, "after_ccc"] != table.loc[0, "before_ccc"]
    # The checkpoint describes the adapter: train.py predicts and extracts features with it.
    model = folder / "subject_1" / "last.save"
    run(train, *split(workspace), "--mods", MODS, "--load", model, "--test", "--features",
        "--pred_dir", folder / "again", "--feat_dir", folder / "again", "--ledger", "none")
    video = "Subject_1_Story_1"
    assert (folder / "again" / "pred_test" / f"{video}.csv").read_bytes() == \
        (folder / "pred_test" / f"{video}.csv").read_bytes()
    import numpy as np
    assert np.load(folder / "again" / "feat_test" / f"{video}.npy").shape[1] == 128


def trainable_parameters(network):
    return sum(parameter.numel() for parameter in network.parameters()
               if parameter.requires_grad)


def test_every_family_names_its_head_and_takes_an_adapter():
    for name, entry in families.FAMILIES.items():
        family = entry.network
        model = models.create(name, {"audio": 6})
        assert family.HEAD and all(hasattr(model, module) for module in family.HEAD), name
        head = finetuning.prepare(model, finetuning.Method("head"))
        learning = {key for key, value in head.named_parameters() if value.requires_grad}
        assert learning and all(key.split(".")[0] in family.HEAD for key in learning), name
        adapted = finetuning.prepare(models.create(name, {"audio": 6}),
                                     finetuning.Method("adapter"))
        assert trainable_parameters(adapted) == 2 * 128 + 2, name
        rebuilt = models.from_config(adapted.config)  # what a checkpoint's loader does
        rebuilt.load_state_dict(adapted.state_dict())


def test_a_model_without_the_needed_layers_is_refused():
    class NoDecoder(torch.nn.Module):
        HEAD = ()
    for method, message in (("adapter", "has no decoder"), ("head", "names no head")):
        with pytest.raises(ToolkitError, match=message):
            finetuning.base_check([finetuning.Method(method)])(NoDecoder(), "x.save")


# ---------------------------------------------------------------- anchor and mix

def distance_from_init(folder):
    init, tuned = weights(folder / "init.save"), weights(folder / "subject_1" / "last.save")
    return sum(((tuned[name] - init[name]) ** 2).sum().item() for name in init)


def test_anchor_pulls_the_weights_toward_init(workspace):
    free, anchored = personal_dir(workspace, "free"), personal_dir(workspace, "anchored")
    personalize_run(workspace, free, "--epochs", 4)
    personalize_run(workspace, anchored, "--epochs", 4, "--anchor", 1000)
    assert distance_from_init(anchored) < 0.5 * distance_from_init(free)


def test_anchor_penalty_is_the_weighted_squared_distance():
    model = models.create("lstm", {"audio": 6})
    settings = personalize.options.TrainingSettings()
    method = finetuning.Method("all", anchor=0.5)
    tuning = finetuning.SubjectFineTuning(method, 1, settings, dict(model.named_parameters()))
    assert tuning.weight_decay == 0.0  # instead of the decay toward zero
    assert tuning.penalty(model).item() == 0.0
    with torch.no_grad():
        model.dec_target[2].bias += 2.0
    assert tuning.penalty(model).item() == pytest.approx(0.5 * 4.0)


def test_mix_draws_the_stated_fraction_of_each_batch(workspace):
    videos = datasets.load_videos(workspace / "data" / "Training", ["audio"])
    owner = {video.start: video.subject for video in videos.videos}

    def subject_of(segment):
        return owner[max(start for start in owner if start <= segment[0])]

    batches = finetuning.MixedBatches(videos, 1, 0.3, 5, 10)(torch.Generator().manual_seed(0))
    own = videos.select(subjects=[1]).training_segments(5)
    assert sorted(piece for batch in batches for piece in batch if subject_of(piece) == 1) == \
        sorted(own)  # the subject's pieces, each once
    for batch in batches:
        others = sum(subject_of(piece) != 1 for piece in batch)
        own_pieces = len(batch) - others
        assert own_pieces == 7 or batch is batches[-1]
        assert others == round(own_pieces * 3 / 7)   # 3 of 10 in a full batch
    only_others = finetuning.MixedBatches(videos, 1, 1.0, 5, 10)(torch.Generator().manual_seed(0))
    assert all(subject_of(piece) != 1 for batch in only_others for piece in batch)
    assert [len(batch) for batch in only_others] == [10, 10]  # as many batches as 15 own pieces fill


# ---------------------------------------------------------------- inner cross-validation

def test_inner_cv_chooses_the_method_and_epochs(workspace):
    folder = personal_dir(workspace, "inner")
    table = personalize_run(workspace, folder, "--finetune", "head", "adapter", "--epochs", 1,
                            "--inner_cv", "--keep_inner_weights")
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv")
    assert list(curves["finetune"]) == ["none", "head", "adapter"]
    assert list(curves["epoch"]) == [0, 1, 1]
    assert list(curves.columns[-4:]) == ["val_on_2", "val_on_4", "val_on_5", "mean_ccc"]
    best = curves.loc[curves["mean_ccc"].idxmax()]
    row = table.iloc[0]
    assert (row["finetune"], row["epochs"]) == (best["finetune"], best["epoch"])
    for method in ("head", "adapter"):
        inner = folder / "subject_1" / f"inner_{method}" / "val_on_4" / "last.save"
        assert torch.load(inner, weights_only=True)["finetuning"]["finetune"] == method
    if best["epoch"]:
        assert torch.load(folder / "subject_1" / "last.save",
                          weights_only=True)["finetuning"]["finetune"] == best["finetune"]
    written = pd.read_csv(folder / "personalize.csv")
    assert list(written.columns) == ["subject", "before_ccc", "after_ccc", "finetune", "anchor",
                                     "mix", "weighting", "epochs", "estimated_gain",
                                     "measured_gain"]


def test_inner_cv_calibrates_epoch_0_without_the_held_out_story(workspace):
    """With --calibrate, a fold's fine-tuned model calibrates with the statistics of
    the stories it was tuned on (engine.fit); keeping init.save (epoch 0) is scored
    the same way, not with init.save's statistics, which include the held-out story."""
    folder = personal_dir(workspace, "inner_calibrate")
    personalize_run(workspace, folder, "--finetune", "adapter", "--epochs", 1, "--inner_cv",
                    "--calibrate")
    curves = pd.read_csv(folder / "subject_1" / "inner_cv.csv").set_index("epoch")
    train_all, _ = datasets.load_train_test(*split(workspace)[1::2], datasets.parse_mods(MODS))
    init = checkpoints.load_trained([folder / "init.save"], train_all, False, "cpu")[0]
    own = train_all.with_scaler(init.scaler).select(subjects=[1])
    saved = engine.saved_postprocessing([init], {"calibrate": True}, train_all)
    for story in own.stories:
        held_out, others = own.select(stories=[story]), own.select(exclude_stories=[story])
        fair = engine.evaluate(init.network, held_out, "cpu",
                               saved.with_listener_stats(others.videos))["ccc"]
        leaky = engine.evaluate(init.network, held_out, "cpu", saved)["ccc"]
        assert curves.loc[0, f"val_on_{story}"] == pytest.approx(fair)
        assert fair != pytest.approx(leaky)


# ---------------------------------------------------------------- resuming

@pytest.mark.parametrize("flags", [["--finetune", "head"], ["--finetune", "adapter", "--mix", 0.5],
                                   ["--anchor", 0.1, "--mix", 1]])
def test_each_method_resumes_where_it_stopped(workspace, flags):
    name = "_".join(str(flag).strip("-") for flag in flags).replace(".", "")
    resumed, whole = personal_dir(workspace, f"r_{name}"), personal_dir(workspace, f"w_{name}")
    personalize_run(workspace, resumed, *flags, "--epochs", 1, "--save_freq", 1)
    personalize_run(workspace, resumed, *flags, "--epochs", 2, "--save_freq", 1, "--resume")
    personalize_run(workspace, whole, *flags, "--epochs", 2, "--save_freq", 1)
    assert_same_checkpoints(resumed / "subject_1", whole / "subject_1", ["last.save"])
    other = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                           "--out_dir", str(resumed), "--lr", "1e-3", "--subjects", "1",
                           "--epochs", "3", "--resume", "--finetune", "all")
    assert other.returncode == 1 and "was fine-tuned with --finetune" in other.stderr


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, message", [
    (["--anchor", "-1"], "--anchor must be 0 or more"),
    (["--anchor", "abc"], "--anchor must be a number, got 'abc'"),
    (["--mix", "1.5"], "--mix must be a fraction from 0 to 1"),
    (["--finetune", "head", "adapter"], "2 fine-tuning methods (head, adapter)"),
    (["--finetune", "adapter", "--anchor", "0.1"], "applies to --finetune all and head"),
    (["--mix", "0.5", "--augment", "2"], "--mix and --augment"),
])
def test_bad_methods_stop_before_writing(workspace, flags, message):
    folder = personal_dir(workspace, f"bad_{len(list(workspace.iterdir()))}")
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), *flags)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert [path.name for path in folder.iterdir()] == ["init.save"]


def test_an_adapter_on_an_adapted_model_is_refused(workspace):
    adapted = workspace / "adapted.save"
    model = models.create("lstm", {"audio": 24, "text": 16}).add_adapter()
    torch.save({"model": model.state_dict(), "config": model.config}, adapted)
    folder = personal_dir(workspace, "twice", init=adapted)
    result = run_in_process("personalize.py", *map(str, split(workspace)), "--mods", MODS,
                            "--out_dir", str(folder), "--finetune", "adapter")
    assert result.returncode == 1 and "already holds a listener adapter" in result.stderr
    assert [path.name for path in Path(folder).iterdir()] == ["init.save"]


# ---------------------------------------------------------------- compare_options.py

def test_compare_options_rows_of_the_methods(workspace):
    import compare_options
    out_dir = workspace / "compare"
    (out_dir / "default" / "val_on_1").mkdir(parents=True)  # as its default run leaves it
    shutil.copyfile(workspace / "shared" / "best.save", compare_options.default_fold_model(out_dir))
    names = [name for name, _ in compare_options.chosen_personal_variants(
        out_dir, ["inner_cv_finetune_head"])]
    assert names == ["--inner_cv --finetune head"]
    flags = dict(compare_options.PERSONAL_VARIANTS)[names[0]]
    common = [*map(str, split(workspace)), "--mods", MODS, "--lr", "1e-3", "--subjects", "1"]
    row = compare_options.run_personalization(names[0], flags, common, out_dir, 1)
    table = pd.read_csv(out_dir / "personal_inner_cv_finetune_head" / "personalize.csv")
    subjects = table[table["subject"] != "Mean"]
    assert row["worse"] == (subjects["after_ccc"] < subjects["before_ccc"]).sum()
    assert row["listeners"] == 1 and row["after_ccc"] == pytest.approx(table["after_ccc"].iloc[-1])
    got = list(subjects["finetune"])  # head, or none where init.save was kept
    assert sorted(row["methods"].split(", ")) == sorted(
        f"{name} x{got.count(name)}" for name in set(got))
    assert "| `--inner_cv --finetune head` |" in compare_options.personal_markdown(
        pd.DataFrame([row]))
    with pytest.raises(ToolkitError, match="unknown row mixing"):
        compare_options.chosen_personal_variants(out_dir, ["mixing"])
