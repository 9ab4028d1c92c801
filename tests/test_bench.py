"""bench.py's analytic work counts and its probes (not its timings: those are measured,
never asserted)."""
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import bench
from empathy import datasets, families, models


@pytest.mark.parametrize("dims", [{"audio": 7, "text": 5}, {"audio": 7, "text": 5, "v_sub": 11}])
def test_analytic_flops_equal_the_counted_matrix_products(dims):
    # Without oneDNN the LSTM runs as matrix products that FlopCounterMode sees.
    # Equal lengths: the model runs its LSTM over padding, which the count leaves out.
    torch.manual_seed(0)
    model = models.create("lstm", dims)
    lengths = [5, 5, 5]
    inputs = {mod: torch.randn(sum(lengths), dim) for mod, dim in dims.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the flags' note on Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False):
            with FlopCounterMode(display=False) as forward, torch.no_grad():
                model.eval()(inputs, torch.tensor(lengths))
            with FlopCounterMode(display=False) as training:
                model.train()(inputs, torch.tensor(lengths)).sum().backward()
    assert forward.get_total_flops() == bench.evaluation_flops_per_step(model) * sum(lengths)
    assert training.get_total_flops() == bench.training_flops(model, lengths)


def test_probes_report_memory_and_epoch_times_of_fresh_processes(tiny_data):
    baseline, peak, features = bench.peak_rss(tiny_data, "AT")
    train_set, val_set = datasets.load_train_test(*bench.split_dirs(tiny_data), ["audio", "text"])
    expected = sum(storage.numel() * 4 for video_set in (train_set, val_set)
                   for storage in video_set.features.values())
    assert features == expected / 2**20
    assert 100 < baseline < peak  # MiB: Python and torch alone take more than 100
    seconds = bench.epoch_seconds(tiny_data, threads=1, processes=2)
    assert len(seconds) == 2 and all(value > 0 for value in seconds)


def test_runs_started_together_each_train_a_model(tiny_data, tmp_path):
    seconds = bench.time_train_runs(tiny_data, 2, tmp_path, epochs=1)
    assert len(seconds) == 2 and 0 < seconds[0] <= seconds[1]  # the wall time at each finish
    for run in ("run_0", "run_1"):
        assert (tmp_path / run / "best.save").is_file()
        assert len((tmp_path / run / "metrics.csv").read_text().splitlines()) == 2  # 1 epoch


def test_help_times_name_the_scripts_that_load_torch(tmp_path, monkeypatch):
    main = 'if __name__ == "__main__":\n    import argparse; argparse.ArgumentParser().parse_args()\n'
    (tmp_path / "light.py").write_text(main)
    (tmp_path / "heavy.py").write_text("import torch\n" + main)
    (tmp_path / "library.py").write_text("import torch\n")  # not a script: not timed
    monkeypatch.setattr(bench, "ROOT", tmp_path)
    helps = bench.time_help()
    assert sorted(helps) == ["heavy.py", "light.py"]
    assert helps["heavy.py"][1] and not helps["light.py"][1]
    assert all(seconds > 0 for seconds, _ in helps.values())


def test_bf16_is_measured_beside_fp32_and_the_cpu_is_named():
    # The bf16 epoch itself runs in test_precision.py; here, what the table adds.
    assert bench.precisions("cpu", 5, slow_bf16=True) in ({"fp32": 5, "bf16": 5},
                                                           {"fp32": 5, "bf16": 1})
    assert bench.gemm_throughput("cpu", "bf16", size=64, repeats=1, rounds=1) > 0
    description = bench.cpu_description()
    assert torch.backends.cpu.get_cpu_capability() in description and "amx_bf16" in description


@pytest.mark.parametrize("fast_bf16, measured", [(False, ["fp32"]), (True, ["fp32", "bf16"])])
def test_bf16_is_left_out_where_train_py_refuses_it(monkeypatch, fast_bf16, measured):
    monkeypatch.setattr(bench, "fast_bf16_cpu", lambda: fast_bf16)
    assert list(bench.precisions("cpu", 5)) == measured


def test_a_quick_benchmark_on_tiny_data_prints_every_row(tmp_path, capsys, monkeypatch):
    real_gemm = bench.gemm_throughput  # its 2048^3 products take most of a tiny run
    monkeypatch.setattr(bench, "gemm_throughput",
                        lambda device, precision="fp32": real_gemm(device, precision, size=128,
                                                                   repeats=1, rounds=1))
    report = bench.main(bench.get_args_parser().parse_args(
        ["--data_dir", str(tmp_path), "--subjects", "2", "--seconds", "12", "--epochs", "1",
         "--in_process_only"]))
    assert capsys.readouterr().out.strip().endswith(report)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    for label in ("load features, npy (s)", "[cpu fp32] training work per epoch (GFLOP)",
                  "[cpu fp32] epoch incl. evaluation (s)", "[cpu fp32] fp32 GEMM GFLOP/s (2048^3)"):
        at, atv = (float(value.strip(" |")) for value in rows[label])
        assert at > 0 and atv > 0, label
    # ATV has more inputs than AT: more work per epoch, on the same videos.
    at, atv = (float(v.strip(" |")) for v in rows["[cpu fp32] training work per epoch (GFLOP)"])
    assert atv > at
    for family in families.FAMILIES:  # the table of model families: train and evaluation seconds
        assert all(float(value.strip(" |")) > 0 for value in rows[family][1:3]), family
    for label in bench.AVERAGING:  # the cost of averaging over epochs, against none
        seconds, against_none = (value.strip(" |") for value in rows[label])
        assert float(seconds) > 0 and against_none.endswith("%"), label
    assert rows["none"][1].strip(" |") == "+0.0%"
    assert report.splitlines()[1].startswith("CPU: ")
    assert "peak RSS" not in report and "crossval.py" not in report  # in fresh processes
