"""Bad input: one line naming the file or key and what to do, exit code 2, nothing written."""

import errno
import random
import re
import subprocess
import sys

import pytest
import torch

from pneumonia import evaluate, fit
from pneumonia.core.errors import UserError, continue_with, os_error_line
from pneumonia.core.safeload import safe_load


def run_fit_expecting_error(argv, capsys, tmp_path):
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_info:
        fit.main([*argv, "--runs_root", str(runs)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert not runs.exists() or not any(runs.rglob("*")), "an error must not leave a run behind"
    return err[-1]


def test_missing_data_root_from_the_command_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pneumonia.fit",
            "--data.root",
            str(missing),
            "--runs_root",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: data root {missing} does not exist: pass --data.root DIR with class folders"
    )
    assert not (tmp_path / "runs").exists()


def test_root_without_class_folders(tmp_path, capsys):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    line = run_fit_expecting_error(["--data.root", str(tmp_path / "data")], capsys, tmp_path)
    assert f"data root {tmp_path / 'data'} has no class folders" in line


def test_empty_class_folder(kermany_root, capsys, tmp_path):
    for f in (kermany_root / "NORMAL").iterdir():
        f.unlink()
    line = run_fit_expecting_error(["--data.root", str(kermany_root)], capsys, tmp_path)
    assert f"class folder {kermany_root / 'NORMAL'} is empty" in line


def test_corrupt_image_is_named(kermany_root, capsys, tmp_path):
    bad = kermany_root / "PNEUMONIA" / "person9_bacteria_1.jpeg"
    bad.write_bytes(b"not a jpeg at all")
    line = run_fit_expecting_error(
        ["--data.root", str(kermany_root), "--data.image_size", "32"], capsys, tmp_path
    )
    assert f"cannot decode image {bad}" in line and "data.skip_corrupt" in line


def test_unknown_model_lists_valid_ones(capsys, tmp_path):
    line = run_fit_expecting_error(["--model.name", "resnet99"], capsys, tmp_path)
    assert "unknown model.name 'resnet99'" in line and "se_resnet18" in line and "vgg16" in line


def test_unknown_config_key_lists_valid_ones(capsys, tmp_path):
    line = run_fit_expecting_error(["--data.imagesize", "64"], capsys, tmp_path)
    assert "--data.imagesize" in line and "image_size" in line and "batch_size" in line


def test_unknown_key_in_config_file(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  name: se_resnet18\n  groups: 16\n")
    line = run_fit_expecting_error(["--config", str(config)], capsys, tmp_path)
    assert "'model' does not accept option 'groups'" in line and "gn_groups" in line


def test_image_size_too_small_for_the_model(capsys, tmp_path):
    line = run_fit_expecting_error(
        ["--model.name", "alexnet", "--data.image_size", "32", "--data.synthetic.n_patients", "20"],
        capsys,
        tmp_path,
    )
    assert "image_size 32 is too small for model alexnet" in line


def test_existing_run_dir_is_not_overwritten(capsys, tmp_path):
    run_dir = tmp_path / "kept"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text("{}")
    with pytest.raises(SystemExit):
        fit.main(
            [
                "--data.synthetic.n_patients",
                "20",
                "--data.image_size",
                "32",
                "--run_dir",
                str(run_dir),
            ]
        )
    assert "already holds files" in capsys.readouterr().err
    assert (run_dir / "summary.json").read_text() == "{}"


def _evaluate_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_checkpoint_from_another_model(tmp_path, kermany_root, capsys):
    from pneumonia.models.factory import ModelConfig, create_model
    from pneumonia.training.module import ClassifierModule

    module = ClassifierModule(model={"name": "resnet18"}, optim={}, image_size=32)
    ckpt = {
        "hyper_parameters": dict(module.hparams),
        "state_dict": {
            f"model.{k}": v
            for k, v in create_model(ModelConfig(name="alexnet")).state_dict().items()
        },
    }
    path = tmp_path / "mixed.ckpt"
    torch.save(ckpt, path)
    line = _evaluate_error(["--ckpt", str(path), "--data.root", str(kermany_root)], capsys)
    assert f"checkpoint {path} does not match model 'resnet18'" in line


def test_checkpoint_with_pickled_code_is_refused(tmp_path, kermany_root, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"hyper_parameters": {"model": {}}, "payload": subprocess.CompletedProcess([], 0)}, path
    )
    line = _evaluate_error(["--ckpt", str(path), "--data.root", str(kermany_root)], capsys)
    assert f"cannot read {path}" in line and "pickled objects" in line


def test_file_that_is_not_a_fit_checkpoint(tmp_path, kermany_root, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"w": torch.zeros(2)}, path)
    line = _evaluate_error(["--ckpt", str(path), "--data.root", str(kermany_root)], capsys)
    assert "is not a checkpoint written by pneumonia.fit" in line


@pytest.mark.parametrize("seed", [0, 2, 20])
def test_junk_checkpoint_bytes_are_one_user_error(tmp_path, seed):
    # Unpickling these bytes raises UnpicklingError, IndexError and KeyError in turn.
    path = tmp_path / "junk.ckpt"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(UserError, match=f"cannot read {re.escape(str(path))}: not a PyTorch"):
        safe_load(path)


def test_a_full_disk_says_run_again_unless_the_work_has_its_own_continuation():
    """predict and export have no resume: "run the command again"; a run names its own."""
    err = OSError(errno.ENOSPC, "No space left on device", "out/model.onnx")
    assert os_error_line(err) == (
        "out/model.onnx: No space left on device: free some space, then run the command again"
    )
    continue_with(err, "continue with python -m pneumonia.fit --resume runs/x/version_0")
    assert os_error_line(err) == (
        "out/model.onnx: No space left on device: free some space, then continue with "
        "python -m pneumonia.fit --resume runs/x/version_0"
    )
