"""The benchmarks still run: each on tiny inputs, checking the lines it must print.

Their figures are not checked (timings belong in bench/ output, not in tests); what is
checked is that every script reaches its ratio line, so a refactor cannot quietly break them.
The scripts run in this process (importing torch again per script would cost more than the
runs), except data.py's measurements, which it always runs in fresh processes.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).parents[1] / "bench"


def run_bench(script: str, args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", [script, *args])
    # A script may claim every core (predict_serve does, as a standalone program should); the
    # rest of this worker's tests must not inherit it: under `make test`'s three workers,
    # two-thread torch on two cores made the later tests 10-30x slower.
    threads = torch.get_num_threads()
    try:
        importlib.import_module(script).main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


TRAIN_STEP = ["--sizes", "32", "--norms", "gn", "--width", "16", "--batch", "8", "--threads", "1"]
TRAIN_STEP += ["--steps", "2", "--warmup", "1", "--repeats", "1"]


def test_train_step_bench_compares_lightning_with_a_plain_loop(capsys, monkeypatch):
    out = run_bench("train_step", TRAIN_STEP, capsys, monkeypatch)
    for precision in ("32-true", "bf16-mixed"):  # both by default on a CPU
        assert f"SE-ResNet-18-GN 32 px, {precision}: Lightning" in out
    assert "| plain " in out and " | ratio median " in out
    assert "SE-ResNet-18-GN 32 px: Lightning bf16-mixed/32-true median " in out
    assert "worst median ratio Lightning/plain: " in out and "(goal >= 0.95: " in out
    if not torch.cuda.is_available():  # the machine line names the CPU and its bf16
        assert "native bf16" in out.splitlines()[0]


def test_train_step_bench_says_in_one_line_when_torch_compile_fails(capsys, monkeypatch):
    def compile_fails(model, **kwargs):  # as inductor does: at the first call, not at wrapping
        def call(*args):
            raise RuntimeError("no C++ compiler found\nmore lines")

        return call

    monkeypatch.setattr(torch, "compile", compile_fails)
    args = [*TRAIN_STEP, "--precisions", "32-true", "--compile"]
    out = run_bench("train_step", args, capsys, monkeypatch)
    line = "torch.compile failed on this machine, no compiled figures: RuntimeError: no C++ "
    line += "compiler found"
    assert out.count("torch.compile failed") == 1 and f"{line}\n" in out
    assert "plain compiled" not in out and "SE-ResNet-18-GN 32 px, 32-true: Lightning" in out


def test_data_bench_compares_the_cache_with_imagefolder(kermany_root, capsys, monkeypatch):
    args = ["--root", str(kermany_root), "--size", "32", "--workers", "0", "--repeats", "1"]
    out = run_bench("data", [*args, "--cache_size", "48"], capsys, monkeypatch)
    assert "cache, each later epoch: " in out and "ImageFolder + PIL, every epoch (27 images" in out
    assert "speed-up per image, later epoch, median: " in out
    # The size check decodes the folder at 48 px: 27 images of 48 x 48 bytes and a small header.
    line = next(x for x in out.splitlines() if x.startswith("48 px cache of 27 images"))
    assert float(line.split("MB: ")[1].split()[0]) == pytest.approx(27 * 48 * 48 / 1e6, abs=0.05)


def test_data_bench_names_a_wrong_root(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        run_bench("data", ["--root", str(tmp_path)], capsys, monkeypatch)
    assert (
        exit_.value.code
        == f"--root {tmp_path}: no NORMAL/ folder there; pass a Kermany train folder"
    )


def test_federated_bench_times_both_runs(capsys, monkeypatch):
    args = ["--patients", "30", "--size", "32", "--width", "16", "--rounds", "1"]
    out = run_bench(
        "federated", [*args, "--local_epochs", "1", "--repeats", "1"], capsys, monkeypatch
    )
    assert "3 clients x 1 rounds x 1 local epochs vs 1 centralized epochs" in out
    assert "FedAvg / centralized wall time, median: " in out


def test_paper_protocol_bench_refuses_a_machine_without_gpu(kermany_root, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        run_bench("paper_protocol", ["--root", str(kermany_root)], capsys, monkeypatch)
    assert "no CUDA GPU here" in exit_.value.code


def test_paper_protocol_bench_runs_a_shrunken_protocol_on_cpu(kermany_root, capsys, monkeypatch):
    args = ["--root", str(kermany_root), "--allow_cpu", "--federated.rounds", "1"]
    args += ["--federated.local_epochs", "1", "--data.image_size", "32", "--model.width", "16"]
    out = run_bench("paper_protocol", [*args, "--data.val_fraction", "0.3"], capsys, monkeypatch)
    assert "3 clients x 1 rounds x 1 local epochs, 32 px, batch 32" in out
    assert "minutes for the protocol: " in out and "val accuracy" in out


def test_a_bad_fit_option_in_a_bench_is_one_line(capsys, monkeypatch):
    args = ["--patients", "30", "--size", "32", "--width", "24", "--repeats", "1"]
    with pytest.raises(SystemExit) as exit_:
        run_bench("federated", args, capsys, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert err == [
        "error: model.se_reduction 16 must divide model.width 24 (at width 64: 4, 8, 16)"
    ]


def test_flower_bench_splits_a_round_from_the_nodes_instants(monkeypatch):
    """bench/flower.py's whole run is a Flower federation (minutes), so only its arithmetic is
    checked here: two clients of one round, against hand-computed segment means."""
    monkeypatch.syspath_prepend(str(BENCH))
    flower = importlib.import_module("flower")
    node = dict(handler=20, ready=21, trained=24, received=25)
    status = {
        "timings": [
            {"0": {"sent": 10, **node}, "1": {"sent": 10, **{k: v + 1 for k, v in node.items()}}}
        ]
    }
    lines = flower.breakdown(status, [17.5])
    values = {line.split()[0]: float(line.split()[1]) for line in lines}
    # client 0: start 10 (send to handler: delivery, process start-up, imports), setup 1,
    # training 3, reply 1; client 1 does every step 1 s later, so only its start (11) differs.
    assert values == {
        "start": 10.5,
        "setup": 1.0,
        "training": 3.0,
        "reply": 1.0,
        "server": 1.5,  # the round took 17.5 s; the last reply came 16 s after sending
    }


def test_predict_serve_bench_reaches_its_ratio_and_latency_lines(tmp_path, capsys, monkeypatch):
    args = ["--root", str(tmp_path / "none"), "--images", "6", "--size", "32", "--width", "16"]
    args += ["--batch", "4", "--repeats", "1", "--requests", "4", "--threads", "1"]
    out = run_bench("predict_serve", args, capsys, monkeypatch)
    assert "6 synthetic 1500x1200 JPEGs" in out
    assert "predict / plain: " in out and "(goal >= 0.9: " in out
    assert "| 4 concurrent clients, cam=true | " in out
    assert "what the server adds per request" in out


def test_privacy_bench_compares_dp_sgd_with_plain_training(capsys, monkeypatch):
    args = ["--images", "48", "--size", "32", "--width", "16", "--repeats", "1"]
    args += ["--batch", "16", "--resnet_batch", "16"]
    out = run_bench("privacy", args, capsys, monkeypatch)
    for model in ("scatter_linear", "scatter_cnn", "wsgn_cnn", "se_resnet18 (gn)"):
        line = f"{model} DP-SGD / plain, seconds per optimizer step: "
        assert line in out and f"{model:16s} private  batch   16: step " in out
    for model in ("scatter_linear", "scatter_cnn", "wsgn_cnn"):
        assert f"{model} / se_resnet18 (gn), DP-SGD seconds per epoch of 48 images: " in out
    goal = "shipped private recipe (fl_private_cpu.yaml: scatter_linear, 32 px, batch 16"
    (line,) = [line for line in out.splitlines() if line.startswith(goal)]
    assert "DP-SGD / plain, seconds per optimizer step: " in line and "(goal < 2: " in line


def test_options_bench_times_every_option_against_the_default(capsys, monkeypatch):
    args = ["--size", "32", "--width", "16", "--batch", "4", "--repeats", "1"]
    out = run_bench("options", args, capsys, monkeypatch)
    assert "default " in out and "x1.00" in out
    for label in (
        "model.activation maxout",
        "loss.name cosface",
        "optim.name rmsprop",
        "model.norm brn",
    ):
        assert label in out
    assert "options above 1.5x the default's step: " in out
