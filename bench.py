"""Benchmark the toolkit at full OMG-Empathy scale and print the figures as tables.

    python bench.py                  # about 5 minutes on 2 cores with fast bfloat16
    python bench.py --cuda           # the same figures on the GPU as well

Generates 10 subjects x 5 stories x 300 s of synthetic data (990/300/4096/4096-d;
story 1 validates, stories 2-5 train) as .npy and .csv in a temporary folder, then
measures: loading AT and ATV features from CSV (first and second run) and from
npy; seconds per epoch of the AT and ATV models, training step and evaluation pass
separately; the analytic floating-point work of a training epoch against the
machine's matrix-multiply throughput in the same precision, measured in the same run;
wall time of a short crossval.py with --jobs 1 and --jobs 2; peak resident memory;
and that batched evaluation equals per-video evaluation. The model figures are
measured in float32 and bfloat16 (--precision bf16) side by side, even on a CPU
without fast bfloat16 (where train.py refuses bf16): there one bf16 epoch is timed,
as it takes tens of times as long. The first line names the CPU and its bfloat16
hardware. A second table times every model family (--model) on the AT data in
float32.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import make_data
from empathy import datasets, families, parallel, utils
from empathy.precision import fast_bf16_cpu

# imported on first use, so that --help loads no torch

ROOT = Path(__file__).resolve().parent
MODELS = {"AT": ["audio", "text"], "ATV": ["audio", "text", "v_sub"]}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # names in torch


def get_args_parser():
    parser = argparse.ArgumentParser("bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", help="where to generate the data (default: a temporary "
                                           "folder, removed afterwards)")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per model; their "
                                                              "median is reported (default: "
                                                              "%(default)s)")
    parser.add_argument("--cv_epochs", type=int, default=20,
                        help="epochs per fold of the timed crossval.py (default: %(default)s; "
                             "fewer measure mostly the workers' start)")
    parser.add_argument("--cuda", action="store_true", help="also measure on the GPU")
    parser.add_argument("--slow_bf16", action="store_true",
                        help="measure bf16 (one epoch) on a CPU without fast bfloat16 too, "
                             "where train.py refuses it: about 20 minutes more on 2 cores")
    parser.add_argument("--subjects", type=int, default=10,
                        help="subjects of the generated data, 5 stories each (default: "
                             "%(default)s, the challenge's size)")
    parser.add_argument("--seconds", type=int, default=300,
                        help="seconds per video of the generated data (default: %(default)s)")
    parser.add_argument("--in_process_only", action="store_true",
                        help="leave out what runs in fresh processes (peak memory, crossval.py "
                             "wall times, fresh-process epochs): a quick look")
    parser.add_argument("--rss_probe", help=argparse.SUPPRESS)  # internal: one model in a clean process
    parser.add_argument("--epoch_probe", help=argparse.SUPPRESS)  # internal: one epoch, given threads
    return parser


# ---------------------------------------------------------------- measurements

def generate(data_root, file_format, subjects=10, seconds=300):
    folder = Path(data_root) / file_format
    if not (folder / "Training").is_dir():
        make_data.main(make_data.get_args_parser().parse_args([
            "--out_dir", str(folder), "--subjects", str(subjects), "--stories", "5",
            "--seconds", str(seconds), "--length_spread", "0", "--format", file_format,
            "--test_stories"]))
    return folder


def split_dirs(folder):
    return [folder / "Training", folder / "Validation"]


def time_loading(csv_dir, npy_dir, mods):
    with tempfile.TemporaryDirectory() as cache:
        os.environ["OMG_CACHE_DIR"] = cache
        timings = {}
        for label, folder in (("csv, first run", csv_dir), ("csv, second run", csv_dir),
                              ("npy", npy_dir)):
            start = time.perf_counter()
            datasets.load_videos(split_dirs(folder), mods)
            timings[label] = time.perf_counter() - start
    return timings


def forward_flops_per_step(model):
    """Multiply-adds x 2 of one valid step's forward pass: {"embed": the per-modality
    embeddings, "rest": attention, LSTM and decoder}."""
    config = model.config
    fused = config["embed_dim"] * len(model.mods)
    hidden, attn = config["hidden_dim"], config["attn_dim"]
    attention = 2 * fused * attn + 2 * attn * config["attn_len"]
    lstm = 2 * 4 * hidden * (fused + hidden)
    decoder = 2 * hidden * config["decoder_dim"] + 2 * config["decoder_dim"]
    return {"embed": sum(2 * dim * config["embed_dim"] for dim in model.input_dims.values()),
            "rest": attention + lstm + decoder}


def training_flops(model, lengths):
    """Forward and backward over sequences of `lengths` steps. The backward pass costs
    twice the forward (gradients of inputs and weights), except for the embeddings,
    whose inputs are data, and the LSTM's zero initial state: neither needs a gradient."""
    forward = forward_flops_per_step(model)
    hidden = model.config["hidden_dim"]
    return ((2 * forward["embed"] + 3 * forward["rest"]) * sum(lengths)
            - 2 * 4 * hidden * hidden * len(lengths))


def evaluation_flops_per_step(model):
    return sum(forward_flops_per_step(model).values())


def gemm_throughput(device, precision="fp32", size=2048, repeats=10, rounds=5):
    """Matrix-multiply GFLOP/s of this machine in `precision` with the current threads:
    the best of several rounds, so that a busy moment does not flatter the ratio to it.
    A product that takes over a second (bfloat16 without hardware support) is timed once."""
    import torch
    dtype = getattr(torch, DTYPES[precision])
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    start = time.perf_counter()
    a @ b
    if time.perf_counter() - start > 1.0:
        repeats, rounds = 1, 1
    else:
        for _ in range(2):
            a @ b
    best = 0.0
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def synchronize(device):
    import torch
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def precisions(device, epochs, slow_bf16=False):
    """{precision: timed epochs} on `device`: fp32 and bf16; on a CPU without fast
    bfloat16 (where it takes tens of times as long) bf16 only with `slow_bf16`, for
    one epoch."""
    import torch
    if torch.device(device).type == "cuda":
        return {"fp32": epochs, **({"bf16": epochs} if torch.cuda.is_bf16_supported() else {})}
    if fast_bf16_cpu():
        return {"fp32": epochs, "bf16": epochs}
    return {"fp32": epochs, **({"bf16": 1} if slow_bf16 else {})}


def cpu_description():
    """'AMD EPYC; capability AVX2; amx_bf16 no, avx512_bf16 no; fast bf16 no'."""
    import torch
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text() if cpuinfo.is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("model name")]
    flags = set(text.split())
    have = {flag: "yes" if flag in flags else "no" for flag in ("amx_bf16", "avx512_bf16")}
    return (f"{names[0] if names else 'unknown CPU'}; capability "
            f"{torch.backends.cpu.get_cpu_capability()}; amx_bf16 {have['amx_bf16']}, "
            f"avx512_bf16 {have['avx512_bf16']}; fast bf16 "
            f"{'yes' if fast_bf16_cpu() else 'no (train.py refuses --precision bf16)'}")


def start_training(train_set, device, precision="fp32", family=families.DEFAULT_MODEL):
    """The training (engine.TrainingRun, which neither validates nor saves) of a seeded
    model of `family` with its default sizes and the default training settings."""
    from empathy import engine, models, options
    engine.seed_everything(1)
    model = models.create(family, train_set.input_dims).to(device)
    settings = options.TrainingSettings(precision=precision)
    return engine.TrainingRun(model, engine.Training(train_set, settings, device))


def time_training(npy_dir, mods, device, epochs, precision="fp32", family=families.DEFAULT_MODEL):
    """Median seconds of a training step and of an evaluation pass of `family`, and the
    largest difference between batched and per-video evaluation; with the trained
    model, its training pieces and the validation set."""
    from empathy import engine
    train_set, val_set = datasets.load_train_test(*split_dirs(npy_dir), mods)
    run = start_training(train_set, device, precision, family)
    model = run.model

    def one_epoch():
        start = time.perf_counter()
        engine.train_one_epoch(run)
        synchronize(device)
        middle = time.perf_counter()
        engine.evaluate(model, val_set, device, precision=precision)
        synchronize(device)
        return middle - start, time.perf_counter() - middle

    with engine.reused_heap():  # as in engine.fit
        if epochs > 1:  # a single timed epoch is one of slow bf16, which a warm-up would double
            one_epoch()  # warm-up: allocator, kernels
        timings = np.array([one_epoch() for _ in range(epochs)])
    # The median: on a shared machine a few epochs are slowed by other load.
    train_seconds, eval_seconds = np.median(timings, axis=0)
    measured = {"train_s": train_seconds, "eval_s": eval_seconds,
                "batched_vs_alone": batched_vs_alone(model, val_set, device, precision)}
    return measured, model, run.segments, val_set


def time_epochs(npy_dir, mods, device, epochs, precision="fp32"):
    """The guide's model: seconds per training step and per evaluation pass, and
    achieved GFLOP/s."""
    measured, model, segments, val_set = time_training(npy_dir, mods, device, epochs, precision)
    flops = training_flops(model, [length for _, length in segments])
    eval_flops = evaluation_flops_per_step(model) * sum(video.n_seconds for video in val_set.videos)
    return {**measured, "gflop": flops / 1e9, "gflops": flops / measured["train_s"] / 1e9,
            "eval_gflop": eval_flops / 1e9}


def batched_vs_alone(model, video_set, device, precision="fp32"):
    """Largest difference between predicting all videos as one batch and one by one."""
    from empathy import engine
    batched = engine.predict(model, video_set, device, precision=precision)
    alone = [engine.predict(model, video_set.subset([video]), device, precision=precision)[0]
             for video in video_set.videos]
    return max(float(np.abs(a - b).max()) for a, b in zip(batched, alone))


def time_crossval(npy_dir, jobs, epochs, out_dir, stories):
    command = [sys.executable, str(ROOT / "crossval.py"), "--mods", "audio,text",
               "--stories", *map(str, stories),
               "--epochs", str(epochs), "--save_freq", str(epochs), "--jobs", str(jobs),
               "--train_dir", str(npy_dir / "Training"), "--test_dir", str(npy_dir / "Validation"),
               "--out_dir", str(out_dir)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def time_train_runs(npy_dir, processes, out_dir, epochs=4):
    """Wall seconds of each of `processes` 4-epoch AT train.py runs started together."""
    commands = [[sys.executable, str(ROOT / "train.py"), "--mods", "audio,text",
                 "--epochs", str(epochs), "--train_dir", str(npy_dir / "Training"),
                 "--test_dir", str(npy_dir / "Validation"),
                 "--model_dir", str(out_dir / f"run_{index}")] for index in range(processes)]
    start = time.perf_counter()
    started = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
               for command in commands]
    seconds = []
    for process in started:
        _, errors = process.communicate()
        if process.returncode:
            raise RuntimeError(f"train.py failed: {errors.decode()[-500:]}")
        seconds.append(time.perf_counter() - start)
    return seconds


def time_help():
    """{script: (wall seconds of `python script --help` in a fresh process, whether it
    imported torch)} for every script of the toolkit."""
    results = {}
    for path in sorted(ROOT.glob("*.py")):
        if 'if __name__ == "__main__":' not in path.read_text():
            continue
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", str(path), "--help"],
                              check=True, capture_output=True, text=True)
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
        results[path.name] = (time.perf_counter() - start, "torch" in imported)
    return results


def peak_rss(npy_dir, name, precision="fp32"):
    """Peak resident memory of a fresh process that loads one model's data, trains
    an epoch and evaluates in `precision`; with the memory of Python and torch before
    loading."""
    result = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--rss_probe",
                             f"{name}:{precision}:{npy_dir}"], check=True, capture_output=True,
                            text=True)
    baseline, peak, feature_bytes = map(int, result.stdout.split())
    return baseline / 2**20, peak / 2**20, feature_bytes / 2**20


def high_water_rss():
    """This process's peak resident memory in bytes. (ru_maxrss would do, but Linux
    carries it over from the parent across fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def warm_up_torch():
    """One optimizer step of a tiny model: loads what every run loads whatever its data
    (the optimizer's first step imports torch._dynamo, about 70 MiB; oneDNN's LSTM
    and GEMM set up), so that the baseline holds Python and torch, not our data."""
    from empathy import engine, models
    import torch
    model = models.create(families.DEFAULT_MODEL, {"audio": 4})
    optimizer = engine.build_optimizer(model, 1e-5, 5e-4)
    model(({"audio": torch.zeros(6, 4)}), torch.tensor([4, 2])).sum().backward()
    optimizer.step()


def rss_probe(spec):
    from empathy import engine
    name, precision, folder = spec.split(":", 2)
    warm_up_torch()
    baseline = high_water_rss()
    train_set, val_set = datasets.load_train_test(*split_dirs(Path(folder)), MODELS[name])
    feature_bytes = sum(storage.numel() * 4 for video_set in (train_set, val_set)
                        for storage in video_set.features.values())
    run = start_training(train_set, "cpu", precision)
    with engine.reused_heap():  # as in engine.fit
        engine.train_one_epoch(run)
        engine.evaluate(run.model, val_set, "cpu", precision=precision)
    # as --test and --features do after training
    engine.evaluate(run.model, train_set, "cpu", precision=precision)
    print(baseline, high_water_rss(), feature_bytes)


def epoch_seconds(npy_dir, threads, processes):
    """Seconds of one AT training epoch (the fastest of three) in each of `processes`
    fresh processes started together, each on `threads` threads: what a crossval.py
    worker sees."""
    probes = [subprocess.Popen([sys.executable, str(ROOT / "bench.py"), "--epoch_probe",
                                f"{threads}:{npy_dir}"], stdout=subprocess.PIPE, text=True)
              for _ in range(processes)]
    outputs = [probe.communicate()[0] for probe in probes]
    if any(probe.returncode for probe in probes):
        raise RuntimeError(f"an --epoch_probe process failed with threads={threads}")
    return [float(output) for output in outputs]


def epoch_probe(spec, epochs=3):
    """Prints the fastest of `epochs` timed epochs: the ceiling compares what the
    machine can do on 1 and 2 threads, so moments slowed by other load are left out."""
    from empathy import engine
    import torch
    threads, folder = spec.split(":", 1)
    torch.set_num_threads(int(threads))
    train_set, _ = datasets.load_train_test(*split_dirs(Path(folder)), MODELS["AT"])
    run = start_training(train_set, "cpu")
    seconds = []
    with engine.reused_heap():  # as in engine.fit
        engine.train_one_epoch(run)  # warm-up
        for _ in range(epochs):
            start = time.perf_counter()
            engine.train_one_epoch(run)
            seconds.append(time.perf_counter() - start)
    print(min(seconds))


# ---------------------------------------------------------------- report

def model_rows(npy_dir, device, precision, epochs):
    """Table rows of both models trained and evaluated in `precision` on `device`, and
    their seconds per epoch including evaluation."""
    gemm = gemm_throughput(device, precision)
    epoch = {name: time_epochs(npy_dir, mods, device, epochs, precision)
             for name, mods in MODELS.items()}
    tag = f"[{device} {precision}]"
    lines = []
    rows = [
        (f"training step per epoch (s, median of {epochs})", "train_s", "{:.3f}"),
        ("evaluation pass, 10 validation videos (s)", "eval_s", "{:.3f}"),
        ("training work per epoch (GFLOP)", "gflop", "{:.1f}"),
        ("achieved training GFLOP/s", "gflops", "{:.1f}"),
        ("batched vs per-video evaluation, max difference", "batched_vs_alone", "{:.1e}"),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {tag} {label} | {fmt.format(epoch['AT'][key])} | "
                     f"{fmt.format(epoch['ATV'][key])} |")
    seconds = {name: epoch[name]["train_s"] + epoch[name]["eval_s"] for name in MODELS}
    lines.append(f"| {tag} epoch incl. evaluation (s) | {seconds['AT']:.3f} | {seconds['ATV']:.3f} |")
    lines.append(f"| {tag} {precision} GEMM GFLOP/s (2048^3) | {gemm:.1f} | {gemm:.1f} |")
    lines.append(f"| {tag} training GFLOP/s / GEMM GFLOP/s | "
                 f"{epoch['AT']['gflops'] / gemm:.0%} | {epoch['ATV']['gflops'] / gemm:.0%} |")
    # What the arithmetic alone takes if every FLOP ran at the GEMM speed.
    lines.append(f"| {tag} floor: evaluation pass at GEMM speed (s) | "
                 f"{epoch['AT']['eval_gflop'] / gemm:.3f} | {epoch['ATV']['eval_gflop'] / gemm:.3f} |")
    lines.append("| {} floor: epoch incl. evaluation at GEMM speed (s) | {:.3f} | {:.3f} |".format(
        tag, *((epoch[name]["gflop"] + epoch[name]["eval_gflop"]) / gemm for name in MODELS)))
    return lines, seconds


def run_benchmark(data_root, epochs, cv_epochs, cuda, slow_bf16=False, subjects=10, seconds=300,
                  in_process_only=False):
    import torch
    npy_dir = generate(data_root, "npy", subjects, seconds)
    csv_dir = generate(data_root, "csv", subjects, seconds)
    threads = torch.get_num_threads()
    lines = [f"torch {torch.__version__}, {threads} threads, {parallel.available_cores()} cores",
             f"CPU: {cpu_description()}", "", "| measurement | AT | ATV |", "|---|---|---|"]
    loading = {name: time_loading(csv_dir, npy_dir, mods) for name, mods in MODELS.items()}
    for label in loading["AT"]:
        lines.append(f"| load features, {label} (s) | {loading['AT'][label]:.2f} | "
                     f"{loading['ATV'][label]:.2f} |")
    devices = ["cpu"] + (["cuda"] if cuda and torch.cuda.is_available() else [])
    for device in devices:
        lines += device_rows(npy_dir, device, precisions(device, epochs, slow_bf16))
    if not in_process_only:
        lines += memory_rows(npy_dir, precisions("cpu", epochs, slow_bf16))
        lines += [""] + process_lines(npy_dir, cv_epochs, threads)
    for device in devices:
        lines += family_rows(npy_dir, device, epochs)
    lines += averaging_rows(npy_dir, epochs)
    return "\n".join(lines)


def device_rows(npy_dir, device, timed_epochs):
    """The model rows of every precision on `device`, and bf16's speed-up."""
    lines, epoch_s = [], {}
    for precision, timed in timed_epochs.items():
        rows, epoch_s[precision] = model_rows(npy_dir, device, precision, timed)
        lines += rows
    if "bf16" in epoch_s:
        lines.append(f"| [{device}] bf16 speed-up, epoch incl. evaluation (fp32 s / bf16 s) | "
                     + " | ".join(f"{epoch_s['fp32'][name] / epoch_s['bf16'][name]:.2f}x"
                                  for name in MODELS) + " |")
    return lines


def family_rows(npy_dir, device, epochs):
    """A table of one row per model family (--model) with its default sizes, trained
    and evaluated on the AT data in float32 on `device`."""
    lines = ["", f"| --model, AT, [{device} fp32] | parameters | training step per epoch (s, "
                 f"median of {epochs}) | evaluation pass (s) | epoch incl. evaluation (s) | "
                 "batched vs per-video evaluation, max difference |", "|---|---|---|---|---|---|"]
    for family in families.FAMILIES:
        measured, model, _, _ = time_training(npy_dir, MODELS["AT"], device, epochs, "fp32", family)
        parameters = sum(parameter.numel() for parameter in model.parameters())
        lines.append(f"| {family} | {parameters / 1e6:.2f} M | {measured['train_s']:.3f} | "
                     f"{measured['eval_s']:.3f} | {measured['train_s'] + measured['eval_s']:.3f} | "
                     f"{measured['batched_vs_alone']:.1e} |")
    return lines


AVERAGING = {"none": {}, "--ema 0.99": {"ema": 0.99}, "--swa_start 1": {"swa_start": 1},
             "--average_last (every epoch)": {"average_last": "all"}}


def averaging_rows(npy_dir, epochs):
    """Seconds per AT epoch (training and the evaluation every epoch does) with each
    kind of averaging over epochs, and its cost against none: the median of
    `epochs` epochs after a warm-up, through engine.TrainingRun as engine.fit runs it.
    The variants take turns epoch by epoch, each first in turn, so that other load
    slows them alike."""
    from empathy import engine, models, options
    from empathy.postprocessing import Postprocessing
    train_set, val_set = datasets.load_train_test(*split_dirs(npy_dir), MODELS["AT"])
    training_runs = {}
    with tempfile.TemporaryDirectory() as model_root:
        for label, extra in AVERAGING.items():
            extra = {name: epochs + 1 if value == "all" else value for name, value in extra.items()}
            settings = options.TrainingSettings(epochs=epochs + 1, **extra)
            engine.seed_everything(1)
            model = models.create(families.DEFAULT_MODEL, train_set.input_dims)
            folder = Path(model_root) / str(len(training_runs))
            training_runs[label] = engine.TrainingRun(
                model, engine.Training(train_set, settings, "cpu"),
                engine.Validation(val_set, Postprocessing()), folder)
            training_runs[label].model_dir.mkdir()
        seconds = {label: [] for label in training_runs}
        with engine.reused_heap():
            for epoch in range(epochs + 1):
                turns = list(training_runs.items())
                for label, run in turns[epoch % len(turns):] + turns[:epoch % len(turns)]:
                    start = time.perf_counter()
                    run.train_epoch()
                    if epoch:  # the first is a warm-up
                        seconds[label].append(time.perf_counter() - start)
    median = {label: float(np.median(values)) for label, values in seconds.items()}
    lines = ["", f"| averaging over epochs, AT [cpu fp32] | epoch incl. evaluation (s, median of "
                 f"{epochs}) | against none |", "|---|---|---|"]
    for label, value in median.items():
        lines.append(f"| {label} | {value:.3f} | {100 * (value / median['none'] - 1):+.1f}% |")
    return lines


def memory_rows(npy_dir, precisions_measured):
    lines = []
    for precision in precisions_measured:
        rss = {name: peak_rss(npy_dir, name, precision) for name in MODELS}
        if precision == "fp32":
            lines.append("| features in memory, float32 (MiB) | " +
                         " | ".join(f"{rss[name][2]:.0f}" for name in MODELS) + " |")
        lines.append(f"| peak RSS, {precision} (MiB) | " +
                     " | ".join(f"{rss[name][1]:.0f}" for name in MODELS) + " |")
        lines.append(f"| peak RSS above Python+torch, {precision} (MiB) | " +
                     " | ".join(f"{rss[name][1] - rss[name][0]:.0f}" for name in MODELS) + " |")
        lines.append(f"| (peak RSS above Python+torch) / features, {precision} | " +
                     " | ".join(f"{(rss[name][1] - rss[name][0]) / rss[name][2]:.2f}"
                                for name in MODELS) + " |")
    return lines


def process_lines(npy_dir, cv_epochs, threads):
    """crossval.py's wall times with --jobs 1 and 2, and fresh-process epochs."""
    lines = []
    stories = [1, 2, 3, 4, 5]  # the challenge's five folds
    with tempfile.TemporaryDirectory() as out:
        one = time_crossval(npy_dir, 1, cv_epochs, Path(out) / "jobs1", stories)
        two = time_crossval(npy_dir, 2, cv_epochs, Path(out) / "jobs2", stories)
    lines.append(f"crossval.py, AT, {len(stories)} folds x {cv_epochs} epochs: --jobs 1 "
                 f"{one:.1f} s, --jobs 2 {two:.1f} s, --jobs 2 speed-up {one / two:.2f}x")
    with tempfile.TemporaryDirectory() as out:
        one, = time_train_runs(npy_dir, 1, Path(out) / "alone")
        two = time_train_runs(npy_dir, 2, Path(out) / "together")
    lines.append(f"two runs at once / one run (4-epoch AT train.py, {threads} threads each): "
                 f"{max(two) / one:.2f} ({one:.1f} s alone, {max(two):.1f} s together)")
    # --jobs 2 runs two folds at once on half the threads each: its ceiling.
    half_threads = max(threads // 2, 1)
    alone, = epoch_seconds(npy_dir, threads, 1)
    half, = epoch_seconds(npy_dir, half_threads, 1)
    side_by_side = max(epoch_seconds(npy_dir, half_threads, 2))
    lines.append(f"one AT epoch in a fresh process: {alone:.2f} s on {threads} threads, {half:.2f} s "
                 f"on {half_threads}, {side_by_side:.2f} s on {half_threads} beside a second such "
                 f"process: two folds at once are at most {2 * alone / side_by_side:.2f}x faster "
                 "per epoch")
    helps = time_help()
    slowest = max(helps, key=lambda script: helps[script][0])
    with_torch = [script for script, (_, torch_loaded) in helps.items() if torch_loaded]
    lines.append(f"--help of each of {len(helps)} scripts in a fresh process: "
                 f"{min(seconds for seconds, _ in helps.values()):.2f}-{helps[slowest][0]:.2f} s "
                 f"(slowest: {slowest}); loading torch: {', '.join(with_torch) or 'none'}")
    return lines


def main(args):
    if args.rss_probe:
        return rss_probe(args.rss_probe)
    if args.epoch_probe:
        return epoch_probe(args.epoch_probe)
    if args.epochs < 1 or args.cv_epochs < 1 or args.subjects < 1 or args.seconds < 10:
        raise utils.ToolkitError("bench.py needs --epochs, --cv_epochs and --subjects >= 1 and "
                                 "--seconds >= 10")
    options = dict(epochs=args.epochs, cv_epochs=args.cv_epochs, cuda=args.cuda,
                   slow_bf16=args.slow_bf16, subjects=args.subjects, seconds=args.seconds,
                   in_process_only=args.in_process_only)
    if args.data_dir:
        report = run_benchmark(args.data_dir, **options)
    else:
        with tempfile.TemporaryDirectory() as data_root:
            report = run_benchmark(data_root, **options)
    print(report)
    return report


if __name__ == "__main__":
    utils.run_cli(main, get_args_parser())
