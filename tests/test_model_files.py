"""Hostile model files: a checkpoint whose recorded sizes lie (a width of 65536, an image size
of 60000, tensors of another width) is refused in one line by every tool that loads it,
before the model takes memory of its own (the ONNX exports' sizes: tests/test_export.py).

The files are conftest's tiny checkpoint, edited. Memory is measured in a child process
(its peak resident size, VmHWM, reset before each call, against the resident size then),
where the suite's own peak cannot hide an allocation.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from conftest import write_image
from hostile_files import one_line, predict_in_child

from pneumonia import ensemble, evaluate, export
from pneumonia.core.errors import UserError
from pneumonia.models.factory import ModelConfig, create_model
from pneumonia.training.checkpoint import load_module, read_checkpoint, write_checkpoint
from pneumonia.training.recipe import Recipe


def edited_checkpoint(source: Path, out: Path, **changes) -> Path:
    """A copy of `source` whose hyper-parameters say otherwise (`model_KEY` for model.KEY)."""
    ckpt = torch.load(source, weights_only=True)
    hparams = ckpt["hyper_parameters"]
    for key, value in changes.items():
        if key.startswith("model_"):
            hparams["model"][key.removeprefix("model_")] = value
        else:
            hparams[key] = value
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "checkpoints" / "best.ckpt")
    return {
        "image": write_image(tmp / "x.png", 100, (40, 40), fmt="PNG"),
        "run": run,
        "width_65536": edited_checkpoint(tiny_checkpoint, tmp / "w65536.ckpt", model_width=65536),
        # In range, but its tensors are those of width 16: refused before it is built.
        "width_256": edited_checkpoint(tiny_checkpoint, tmp / "w256.ckpt", model_width=256),
        "size_60000": edited_checkpoint(tiny_checkpoint, tmp / "s60000.ckpt", image_size=60000),
    }


@pytest.fixture(scope="module")
def refusals(files) -> dict[str, dict]:
    """predict.main on every hostile checkpoint, in one child process."""
    image = str(files["image"])
    labels = ("width_65536", "width_256", "size_60000", "run")
    return predict_in_child([(label, ["--ckpt", str(files[label]), image]) for label in labels])


def test_a_checkpoint_claiming_width_65536_is_refused_in_one_line(files, refusals):
    one_line(refusals["width_65536"], files["width_65536"], "model.width 65536", "<= 512")


def test_a_width_in_range_that_its_tensors_deny_is_refused_before_it_is_built(files, refusals):
    one_line(
        refusals["width_256"], files["width_256"], "does not match model 'se_resnet18'", "size"
    )


def test_a_checkpoint_image_size_of_60000_is_out_of_range_not_too_small(files, refusals):
    result = refusals["size_60000"]
    one_line(result, files["size_60000"], "image_size 60000", ">= 16 and <= 2048")
    assert "too small" not in result["err"]


def test_a_run_folder_given_as_checkpoint_is_a_folder_and_its_best_ckpt_is_named(files, refusals):
    best = files["run"] / "checkpoints" / "best.ckpt"
    one_line(refusals["run"], files["run"], "is a folder", f"give the checkpoint inside it, {best}")
    assert "does not exist" not in refusals["run"]["err"]


@pytest.mark.parametrize("tool", ["evaluate", "export", "serve", "ensemble"])
def test_every_tool_that_loads_a_checkpoint_refuses_the_wide_one(
    tool, files, tmp_path, capsys, monkeypatch
):
    import uvicorn

    from pneumonia.serve import __main__ as serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("it served the file"))
    wide = str(files["width_65536"])
    main, argv = {
        "evaluate": (evaluate.main, ["--ckpt", wide, "--data.root", str(tmp_path)]),
        "export": (export.main, ["--ckpt", wide, "--onnx", str(tmp_path / "m.onnx")]),
        "serve": (serve.main, ["--ckpt", wide]),
        "ensemble": (ensemble.main, ["--members", wide, wide + "x", "--out", str(tmp_path / "e")]),
    }[tool]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1, err
    assert f"{wide}: model.width 65536" in err and not any(tmp_path.iterdir())


def tiny_ensemble(path: Path, member_width: int) -> Path:
    """An ensemble checkpoint of two width-16 members, the second's recipe then edited."""
    member = {"model": {"name": "se_resnet18", "width": 16}, "mean": 0.5, "std": 0.25,
              "image_size": 32, "classes": ["NORMAL", "PNEUMONIA"],
              "positive_class": "PNEUMONIA", "name": "m"}  # fmt: skip
    spec = {"rule": "soft_vote", "members": [member, member], "coef": [0.5, 0.5], "intercept": 0}
    model = create_model(ModelConfig(name="ensemble", ensemble=spec))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    spec["members"][1] = member | {"model": member["model"] | {"width": member_width}}
    recipe = Recipe(asdict(ModelConfig(name="ensemble", ensemble=spec)), {}, 32, mean=0, std=1)
    write_checkpoint(path, state, recipe, round_number=0)
    return path


def test_an_ensemble_member_claiming_width_65536_is_refused_naming_it(tmp_path):
    path = tiny_ensemble(tmp_path / "e.ckpt", 65536)
    with pytest.raises(UserError) as err:
        load_module(path)
    assert str(err.value).startswith(
        f"checkpoint {path}: model.ensemble.members[1].model.width 65536 is outside the range"
    )
    assert load_module(tiny_ensemble(tmp_path / "fine.ckpt", 16)) is not None


def sparse_tensor():
    return torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), [1.0], (10**6, 10**6))


@pytest.mark.parametrize(
    ("tensor", "says"),
    [
        # 10^12 floats over one stored value: scanning it for NaNs would take 1 TB.
        (lambda: torch.zeros(1).expand(10**6, 10**6), r"model.extra claims shape \(1000000, "),
        (sparse_tensor, "not a dict of \\(dense, CPU\\) tensors"),
        (lambda: torch.empty(10**6, 10**6, device="meta"), "not a dict of \\(dense, CPU\\)"),
    ],
    ids=["expanded", "sparse", "meta"],
)
def test_tensors_whose_values_the_file_does_not_hold_are_refused(
    tensor, says, tiny_checkpoint, tmp_path
):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["state_dict"]["model.extra"] = tensor()
    path = tmp_path / "hollow.ckpt"
    torch.save(ckpt, path)
    assert path.stat().st_size < 2 * tiny_checkpoint.stat().st_size
    with pytest.raises(UserError, match=says):
        load_module(path)


def test_old_checkpoints_and_every_config_are_inside_the_ranges():
    from pneumonia.run.config import parse_fit_config
    from pneumonia.training.recipe import make_recipe

    root = Path(__file__).parents[1]
    for ckpt in sorted((root / "tests" / "fixtures").glob("*.ckpt")):
        recipe, _, _ = read_checkpoint(ckpt)
        assert load_module(ckpt).hparams.model["width"] == recipe.model["width"]
    for config in sorted((root / "configs").glob("*.yaml")):
        cfg, _, _ = parse_fit_config(["--config", str(config)])
        recipe = make_recipe(cfg, ("NORMAL", "PNEUMONIA"), [(1, 0.5, 0.3)])
        assert recipe.out_of_range() is None, config
