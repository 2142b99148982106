"""Faults as a user meets them: checkpoints that would run code, interruptions, resumes, a full
disk, odd images, hostile clients. Each through the command line (in-process `main`, or a real
process where a signal is involved): the exit code, the one line, the files left behind."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pneumonia import evaluate, fit
from pneumonia.core.errors import UserError
from pneumonia.data.cache import cache_path, load_or_decode
from pneumonia.data.kermany import list_image_files
from pneumonia.training.checkpoint import CheckpointIO

SMALL = [
    "--figures_every", "0",  # TensorBoard figures: the reported model's only
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "60",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip
CENTRAL = [*SMALL, "--federated.enabled", "false", "--optim.scheduler", "cosine"]
FEDERATED = [*SMALL, "--federated.enabled", "true", "--federated.local_epochs", "1"]
ROOT = Path(__file__).parents[1]


class Payload:
    """Unpickling this creates `path`: what a crafted checkpoint would do with less care."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {}, "epoch": 0, "payload": Payload(marker)}, path)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def fit_exit(argv) -> int:
    with pytest.raises(SystemExit) as stopped:
        fit.main(argv)
    return stopped.value.code


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's contents and modification time."""
    return {
        str(p): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def metrics_rows(run_dir: Path) -> list[dict]:
    with (run_dir / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def central_run(tmp_path_factory):
    """An uninterrupted centralized run of 4 epochs: the reference for resumed ones."""
    run_dir = tmp_path_factory.mktemp("central") / "run"
    fit.main([*CENTRAL, "--trainer.max_epochs", "4", "--run_dir", str(run_dir)])
    return run_dir


@pytest.fixture(scope="module")
def fl_run(tmp_path_factory):
    """An uninterrupted federated run of 4 rounds."""
    run_dir = tmp_path_factory.mktemp("fl") / "run"
    fit.main([*FEDERATED, "--federated.rounds", "4", "--run_dir", str(run_dir)])
    return run_dir


def copy_run(run_dir: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(run_dir), str(to)], check=True)
    return to


# 1. No code runs from any file the package reads, whatever the environment says.


@pytest.fixture
def unsafe_env(monkeypatch):
    """torch honours this for every load that does not pass weights_only itself."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


@pytest.mark.parametrize("kind", ["central", "federated"])
def test_a_crafted_resume_file_runs_no_code(
    kind, central_run, fl_run, tmp_path, capsys, unsafe_env
):
    run_dir = copy_run(central_run if kind == "central" else fl_run, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # unfinished: a resume reads its checkpoints
    target = "last.ckpt" if kind == "central" else "federated_state.pt"
    marker = tmp_path / "pwned"
    plant(run_dir / "checkpoints" / target, marker)
    assert fit_exit(["--resume", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: cannot read {run_dir / 'checkpoints' / target}")
    assert not marker.exists()


def test_lightning_reads_checkpoints_through_the_weights_only_loader(tmp_path, unsafe_env):
    marker = tmp_path / "pwned"
    plant(tmp_path / "last.ckpt", marker)
    with pytest.raises(UserError, match="cannot read"):
        CheckpointIO().load_checkpoint(tmp_path / "last.ckpt")
    assert not marker.exists()


def test_crafted_pretrained_weights_run_no_code(tmp_path, capsys, unsafe_env):
    marker, weights_file = tmp_path / "pwned", tmp_path / "imagenet.pth"
    plant(weights_file, marker)
    runs = tmp_path / "runs"
    code = fit_exit([*CENTRAL, "--model.pretrained", str(weights_file), "--runs_root", str(runs)])
    assert code == 2 and f"cannot read {weights_file}" in one_error_line(capsys)
    assert not marker.exists() and not runs.exists()


def test_crafted_checkpoint_given_to_evaluate_runs_no_code(
    tmp_path, kermany_root, capsys, unsafe_env
):
    marker, ckpt = tmp_path / "pwned", tmp_path / "best.ckpt"
    plant(ckpt, marker)
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--ckpt", str(ckpt), "--data.root", str(kermany_root)])
    assert stopped.value.code == 2 and f"cannot read {ckpt}" in one_error_line(capsys)
    assert not marker.exists()


def test_a_crafted_cache_file_runs_no_code_and_is_decoded_again(kermany_root, tmp_path, unsafe_env):
    files = list_image_files(kermany_root)
    cache = tmp_path / "cache"
    marker = tmp_path / "pwned"
    path = cache_path(files, 32, cache)
    path.parent.mkdir(parents=True)
    plant(path, marker)
    with pytest.warns(UserWarning, match="ignoring unreadable cache file"):
        images = load_or_decode(files, 32, cache)
    assert len(images) == len(files) and not marker.exists()


# 2. Interruptions: never exit 0, always the line that says what is kept.


def start_fit(argv: list[str], done: Path) -> subprocess.Popen:
    """`python -m pneumonia.fit` in a real process, once `done` (a file the run writes after
    its first completed epoch or round) exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.fit", *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not done.exists():
        assert proc.poll() is None, (
            f"fit ended before it could be interrupted: {proc.stderr.read()}"
        )
        assert time.monotonic() < deadline, "no epoch or round completed within 120 s"
        time.sleep(0.02)
    return proc


def interrupt(proc: subprocess.Popen, signum: int) -> tuple[int, str]:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err.strip().splitlines()[-1]


def test_sigterm_ends_a_centralized_run_with_143_and_it_resumes_exactly(central_run, tmp_path):
    run_dir = tmp_path / "killed"
    argv = [*CENTRAL, "--trainer.max_epochs", "4", "--run_dir", str(run_dir)]
    proc = start_fit(argv, run_dir / "checkpoints" / "last.ckpt")
    code, line = interrupt(proc, signal.SIGTERM)
    assert code == 143
    assert line.startswith("interrupted by SIGTERM: epoch")
    assert line.endswith(f"continue with python -m pneumonia.fit --resume {run_dir}")
    assert not (run_dir / "summary.json").exists()
    fit.main(["--resume", str(run_dir)])
    assert_same_weights(weights(run_dir), weights(central_run))
    assert metrics_rows(run_dir) == metrics_rows(central_run)  # every epoch, once


def test_a_signal_between_a_checkpoint_and_its_metrics_rows_loses_no_row(
    central_run, tmp_path, monkeypatch, capsys
):
    """SIGTERM right after epoch 1's last.ckpt is written and before Lightning logs the
    epoch's training metrics: the run stops between batches instead, and the resumed
    metrics.csv equals the uninterrupted one."""
    import lightning as L

    from pneumonia.run import centralized

    class TermAfterCheckpoint(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            if trainer.current_epoch == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    build = centralized.build_trainer

    def with_the_signal(*args, **kwargs):
        trainer, checkpoint = build(*args, **kwargs)
        trainer.callbacks.insert(0, TermAfterCheckpoint())
        return trainer, checkpoint

    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(centralized, "build_trainer", with_the_signal)
        code = fit_exit([*CENTRAL, "--trainer.max_epochs", "4", "--run_dir", str(run_dir)])
    assert code == 143
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .startswith("interrupted by SIGTERM: epoch 1 is saved in ")
    )
    fit.main(["--resume", str(run_dir)])
    assert metrics_rows(run_dir) == metrics_rows(central_run)
    assert_same_weights(weights(run_dir), weights(central_run))


def test_sigint_ends_a_federated_run_with_130_and_it_resumes_exactly(fl_run, tmp_path):
    run_dir = tmp_path / "killed"
    argv = [*FEDERATED, "--federated.rounds", "4", "--run_dir", str(run_dir)]
    proc = start_fit(argv, run_dir / "checkpoints" / "federated_state.pt")
    code, line = interrupt(proc, signal.SIGINT)
    assert code == 130
    assert line.startswith("interrupted by SIGINT: round")
    assert line.endswith(f"continue with python -m pneumonia.fit --resume {run_dir}")
    fit.main(["--resume", str(run_dir)])
    assert_same_weights(weights(run_dir), weights(fl_run))


@pytest.mark.parametrize(("kind", "signum"), [("central", signal.SIGINT), ("fl", signal.SIGTERM)])
def test_the_other_signal_too(kind, signum, tmp_path):
    run_dir = tmp_path / "run"
    if kind == "central":
        argv, done = [*CENTRAL, "--trainer.max_epochs", "6"], "last.ckpt"
    else:
        argv, done = [*FEDERATED, "--federated.rounds", "6"], "federated_state.pt"
    proc = start_fit([*argv, "--run_dir", str(run_dir)], run_dir / "checkpoints" / done)
    code, line = interrupt(proc, signum)
    assert code == 128 + signum
    assert line.startswith(f"interrupted by {signal.Signals(signum).name}: ")
    assert "--resume" in line


# 3. Resume keeps every history file and refuses an edited config.


@pytest.mark.parametrize("kind", ["central", "federated"])
def test_resuming_a_finished_run_changes_nothing(kind, central_run, fl_run, tmp_path, capsys):
    """Its summary (wall_time_s included), history, checkpoints and events stay as they were."""
    run_dir = copy_run(central_run if kind == "central" else fl_run, tmp_path / "run")
    before = snapshot(run_dir)
    summary = fit.main(["--resume", str(run_dir)])
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{run_dir} is complete: nothing to resume (its results: {run_dir / 'summary.json'})"
    )
    assert snapshot(run_dir) == before
    assert summary == json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("kind", ["central", "federated"])
def test_a_signal_during_the_final_scoring_names_the_resume_that_completes_it(
    kind, tmp_path, monkeypatch, capsys
):
    """Every epoch or round is saved when the scoring of best.ckpt starts: the line says so
    and names the command that finishes the run (running the command again is refused)."""
    from pneumonia.run import job

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    run_dir = tmp_path / "run"
    if kind == "central":
        argv, saved = [*CENTRAL, "--trainer.max_epochs", "2"], "epochs 1-2"
    else:
        argv, saved = [*FEDERATED, "--federated.rounds", "2"], "rounds 1-2"
    with monkeypatch.context() as patch:
        patch.setattr(job, "finalize", terminated)
        assert fit_exit([*argv, "--run_dir", str(run_dir)]) == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"interrupted by SIGTERM: {saved} are saved in {run_dir} (the final scoring did not "
        f"finish): continue with python -m pneumonia.fit --resume {run_dir}"
    )
    assert not (run_dir / "summary.json").exists()
    fit.main(["--resume", str(run_dir)])
    assert json.loads((run_dir / "summary.json").read_text())["run_dir"] == str(run_dir)


@pytest.mark.parametrize("damage", ["a file", "missing"])
def test_a_resume_whose_client_folder_is_gone_names_the_hospital(damage, fl_run, tmp_path, capsys):
    """Not a warning and a hospital left out of every later round: its folder (its curves)
    fails each round it trains in."""
    run_dir = copy_run(fl_run, tmp_path / "run")
    (run_dir / "summary.json").unlink()  # stopped during its final scoring: resumable
    folder = run_dir / "clients" / "client_0"
    subprocess.run(["rm", "-r", str(folder)], check=True)
    if damage == "a file":
        folder.write_text("")
    before = snapshot(run_dir)
    assert fit_exit(["--resume", str(run_dir)]) == 2
    problem = "is not a folder" if damage == "a file" else "is missing"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {folder}, the folder of client 0, {problem}: put that client's folder back "
        f"(or replace it with an empty folder to continue without its earlier curves), then "
        f"run the command again"
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("lr: 0.002", "lr: 0.02"), "optim.lr 0.002 -> 0.02"),
        (("image_size: 32", "image_size: 48"), "data.image_size 32 -> 48"),
        (("width: 16", "width: 8"), "model.width 16 -> 8"),
        (("strategy: fedavg", "strategy: fedprox"), "federated.strategy fedavg -> fedprox"),
    ],
)
def test_an_edited_config_is_refused_on_resume_naming_the_key(
    edit, key, central_run, tmp_path, capsys
):
    run_dir = copy_run(central_run, tmp_path / "run")
    config = run_dir / "config.yaml"
    text = config.read_text()
    assert edit[0] in text
    config.write_text(text.replace(edit[0], edit[1], 1))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    assert fit_exit(["--resume", str(run_dir)]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {config} was edited since the run started ({key}")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_safe_edit_is_accepted_and_said(central_run, tmp_path, capsys):
    run_dir = copy_run(central_run, tmp_path / "run")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("num_workers: 0", "num_workers: 1"))
    (run_dir / "checkpoints" / ".last.ckpt.123.tmp").write_bytes(b"half a checkpoint")
    fit.main(["--resume", str(run_dir)])
    out = capsys.readouterr().out
    assert "resuming with data.num_workers 0 -> 1 (safe to change)" in out
    assert "removed 1 temporary file(s)" in out
    assert not list(run_dir.rglob("*.tmp"))


# 4. The file system: one line naming the path; what was written stays readable.


def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch, capsys):
    real_save, calls = torch.save, []

    def full_after_epoch_one(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # best and last of epoch 1 are written; epoch 2 finds a full disk
            Path(path).write_bytes(b"\0" * 10)  # torch leaves a part of the file behind
            raise RuntimeError("[enforce fail at inline_container.cc:672] . file write failed")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_epoch_one)  # core.files imports it lazily
    run_dir = tmp_path / "run"
    assert fit_exit([*CENTRAL, "--trainer.max_epochs", "3", "--run_dir", str(run_dir)]) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: {run_dir / 'checkpoints'}/")
    assert "could not be written (" in line and "file write failed" in line
    assert line.endswith(f"then continue with python -m pneumonia.fit --resume {run_dir}")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not list(run_dir.rglob("*.tmp"))


@pytest.mark.parametrize("key", ["runs_root", "data.cache_dir"])
def test_a_file_where_a_folder_belongs_is_one_line(key, kermany_root, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [*CENTRAL, "--data.root", str(kermany_root), f"--{key}", str(blocker / "sub")]
    assert fit_exit(argv) == 2
    assert one_error_line(capsys) == (
        f"error: {key} {blocker / 'sub'}: {blocker} is a file, not a folder: choose another path"
    )


def test_an_experiment_name_cannot_leave_runs_root(tmp_path, capsys):
    runs = tmp_path / "deep" / "runs"
    assert fit_exit([*CENTRAL, "--experiment", "../../x", "--runs_root", str(runs)]) == 2
    assert "experiment '../../x' must be a plain folder name" in one_error_line(capsys)
    assert not (tmp_path / "x").exists() and not runs.exists()


# Images the decoder meets: palette, GIF, WebP, RGBA become grey; multi-frame files are named.


def test_odd_image_formats_decode_to_one_channel_and_multi_frame_is_named(
    kermany_root, tmp_path, capsys
):
    grey = Image.open(next((kermany_root / "NORMAL").glob("*.jpeg"))).convert("L")
    grey.convert("P").save(kermany_root / "NORMAL" / "IM-0900-0001.png")
    grey.save(kermany_root / "NORMAL" / "IM-0901-0001.gif")
    grey.save(kermany_root / "NORMAL" / "IM-0902-0001.webp")
    grey.convert("RGBA").save(kermany_root / "NORMAL" / "IM-0903-0001.png")
    images = load_or_decode(list_image_files(kermany_root), 32, tmp_path / "cache")
    assert images.images.shape[1:] == (1, 32, 32)
    animated = kermany_root / "NORMAL" / "IM-0904-0001.gif"
    grey.save(animated, save_all=True, append_images=[grey.rotate(90)])
    argv = [*CENTRAL, "--data.root", str(kermany_root), "--runs_root", str(tmp_path / "runs")]
    assert fit_exit(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the decoding bar
        f"error: cannot decode image {animated} (2 frames, expected one image): remove it, or "
        f"set data.skip_corrupt true to skip such files"
    )
    assert not (tmp_path / "runs").exists()


# A model whose weights are not finite is never scored.


def test_evaluate_refuses_non_finite_weights(central_run, kermany_root, tmp_path, capsys):
    ckpt = torch.load(central_run / "checkpoints" / "best.ckpt", weights_only=True)
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key][0] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--ckpt", str(path), "--data.root", str(kermany_root)])
    assert stopped.value.code == 2
    assert one_error_line(capsys) == (
        f"error: checkpoint {path} holds non-finite weights ({key}): it cannot be scored; use "
        f"an earlier checkpoint of the run"
    )


@pytest.mark.parametrize(
    "hparams", [{"model": 3}, {"model": {"name": "resnet18"}, "image_size": "big"}, {"model": {}}]
)
def test_checkpoints_with_foreign_hyper_parameters_are_one_line(
    hparams, kermany_root, tmp_path, capsys
):
    path = tmp_path / "foreign.ckpt"
    torch.save({"hyper_parameters": hparams, "state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(SystemExit) as stopped:
        evaluate.main(["--ckpt", str(path), "--data.root", str(kermany_root)])
    assert stopped.value.code == 2
    assert one_error_line(capsys).startswith(f"error: {path}: its hyper-parameters are not")


def test_interrupt_hint_names_a_fresh_start_when_nothing_was_saved(tmp_path):
    from pneumonia.run.job import resume_hint, saved_so_far

    assert saved_so_far(tmp_path, federated=False) == f"no epoch was completed in {tmp_path}"
    assert resume_hint(tmp_path, resumable=False) == (
        f"start the run again (remove {tmp_path} first)"
    )
