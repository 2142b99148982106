"""The run directory: everything one training run leaves behind, and its one list of names
(every module that writes or reads a run takes its paths from here).

runs/<experiment>/version_N/
  config.yaml             every option, defaults filled in (`--resume` reads it back)
  split.csv               every image's split, class and patient: the split can be checked
  events.out.tfevents.*   TensorBoard: curves, figures, and verdict/* of the reported model
  checkpoints/best.ckpt   the reported model, with its threshold (pneumonia.training.checkpoint)
  checkpoints/last.ckpt   the latest epoch's or round's model
  checkpoints/config.yaml the config the checkpoints were trained under: --resume refuses
                          a config.yaml edited since, except for the keys in SAFE_CHANGES
                          and more rounds or epochs (LONGER) where `why_not_longer` allows
  predictions.csv         P(positive) of best.ckpt for every validation (and test) image
  cases.png               Grad-CAM of best.ckpt's most confident right and wrong decisions
  summary.json            metrics of best.ckpt with 95% intervals, and how it was chosen
centralized runs add
  metrics.csv, hparams.yaml   Lightning's CSV logger: every logged scalar by step and epoch
federated runs add
  partition.csv           each client's images, patients and classes (site_name: its
                          hospital folder, with federated.partition sites)
  rounds.csv              one row per round: each client's n and loss, global metrics, times
  checkpoints/federated_state.pt   what `--resume` continues from (pneumonia.federated.state;
                          what it holds: pneumonia.run.rounds)
  clients/client_J/       each client's own TensorBoard curves (pneumonia.federated.client)
and with federated.cross_site
  cross_site.csv, cross_site.png   every site's local model and the global one on every site
  checkpoints/local_site<J>.ckpt   site J's local model; local/ its TensorBoard curves
and every run holds
  .lock                   locked (flock) by the process writing the run, released when it ends
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import yaml
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from pneumonia.core.errors import UserError
from pneumonia.core.files import write_csv, write_text_atomic
from pneumonia.core.ranks import RUN_DIR_ENV, is_primary
from pneumonia.data.imageset import ImageSet
from pneumonia.federated.state import STATE_FILE
from pneumonia.run.config import RESUME_LONGER, parse_fit_config
from pneumonia.training.schedules import DecayConfig, decay_factor

CONFIG = "config.yaml"
SPLIT = "split.csv"
SUMMARY = "summary.json"
PREDICTIONS = "predictions.csv"
CASES = "cases.png"
METRICS = ExperimentWriter.NAME_METRICS_FILE  # "metrics.csv": Lightning's CSV logger's name
PARTITION = "partition.csv"
ROUNDS = "rounds.csv"
CROSS_SITE_TABLE = "cross_site.csv"
CROSS_SITE_FIGURE = "cross_site.png"
CLIENTS = "clients"  # clients/client_J/: pneumonia.federated.client names its own folder
LOCAL = "local"  # the cross-site local models' curves
CHECKPOINTS = "checkpoints"
# In checkpoints/:
BEST = "best.ckpt"
LAST = "last.ckpt"
ROUND_STATE = STATE_FILE  # pneumonia.federated.state writes and reads it
TRAINED_UNDER = "config.yaml"
# Keys a resumed run may take from an edited config.yaml: how the run is shown and how fast
# it loads change nothing it computes.
SAFE_CHANGES = {"trainer.enable_progress_bar", "trainer.enable_model_summary", "data.num_workers"}
# Keys that may grow, to train longer (`--resume RUN_DIR --federated.rounds N`, or an edited
# config.yaml), where what was trained stays what it was (`why_not_longer`).
LONGER = frozenset(RESUME_LONGER)
# Centralized schedulers whose rate at an epoch does not depend on the number of epochs.
UNPLANNED_SCHEDULERS = ("none", "step", "plateau")
LOCK = ".lock"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def best_checkpoint(run_dir: Path) -> Path:
    """The reported model."""
    return checkpoints_dir(run_dir) / BEST


def last_checkpoint(run_dir: Path) -> Path:
    """The latest epoch's or round's model."""
    return checkpoints_dir(run_dir) / LAST


def round_state(run_dir: Path) -> Path:
    """What a federated run's --resume continues from."""
    return checkpoints_dir(run_dir) / ROUND_STATE


def local_checkpoint(run_dir: Path, site: int) -> Path:
    """Site `site`'s local model of the cross-site matrix."""
    return checkpoints_dir(run_dir) / f"local_site{site}.ckpt"


def client_logs(run_dir: Path) -> Path:
    """Where the clients of a federated run keep their curves, each in client_J/."""
    return Path(run_dir) / CLIENTS


def client_dir(run_dir: Path, client: int) -> Path:
    """Client `client`'s TensorBoard curves (the folder pneumonia.federated.client writes)."""
    return client_logs(run_dir) / f"client_{client}"


def tensorboard_logger(run_dir: Path) -> TensorBoardLogger:
    """The run's own events file, in the run directory itself (no version subfolder)."""
    return TensorBoardLogger(run_dir, name="", version="", default_hp_metric=False)


def check_experiment_name(name: str) -> None:
    """An experiment is a folder name inside runs_root, never a path out of it."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=+-]*", name) or ".." in name:
        raise UserError(
            f"experiment {name!r} must be a plain folder name (letters, digits, _ . = + -): "
            f"runs are written to runs_root/<experiment>/; use --run_dir for another place"
        )


@contextlib.contextmanager
def new_run_dir(
    runs_root: str | Path, experiment: str, run_dir: str | None = None
) -> Iterator[Path]:
    """Create the next runs_root/experiment/version_N (or `run_dir`, which must be empty) and
    hold its lock inside."""
    if run_dir is None:
        path = _next_version(Path(runs_root), experiment)
    else:
        path = Path(run_dir)
        _check_empty(path)
        path.mkdir(parents=True, exist_ok=True)
    hint = "choose a new --run_dir" if run_dir else "run the command again"
    with locked(path, hint):
        _check_empty(path)  # another run may have filled it between the check and the lock
        yield path


@contextlib.contextmanager
def run_directory(cfg) -> Iterator[Path]:
    """A new run's directory. Process 0 of a central run on several devices creates and locks
    it (`new_run_dir`) and names it in its environment, which Lightning's launcher copies into
    the processes it starts at the fit; the copies take it from there, or from --run_dir when
    torchrun or SLURM started them all at once (pneumonia.core.ranks)."""
    if is_primary():
        with new_run_dir(cfg.runs_root, cfg.experiment, cfg.run_dir) as path:
            os.environ[RUN_DIR_ENV] = str(path.resolve())
            yield path
        return
    named = os.environ.get(RUN_DIR_ENV) or cfg.run_dir
    if not named:
        raise UserError(
            "a central run whose processes torchrun or SLURM starts together needs --run_dir: "
            "every process must name the same run directory (process 0 writes it)"
        )
    yield Path(named)


def _check_empty(path: Path) -> None:
    if path.exists() and any(p.name != LOCK for p in path.iterdir()):
        raise UserError(f"run_dir {path} already holds files: choose a new --run_dir or remove it")


def _next_version(runs_root: Path, experiment: str) -> Path:
    while True:  # another run may take the same number between listing and creating
        # Lightning's loggers number their versions this way; ours must agree with them.
        version = CSVLogger(runs_root, name=experiment).version
        path = runs_root / experiment / f"version_{version}"
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def locked(run_dir: Path, hint: str) -> Iterator[None]:
    """Hold the run directory's lock inside: one process writes a run at a time (two would
    interleave their epochs in metrics.csv). The kernel releases it when the process ends,
    however it ends. `hint`: what to do when another process holds it."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{run_dir} is being written by another process{_holder(fd)}: {hint}"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _holder(fd: int) -> str:
    """Who holds the lock on `fd`'s file, as " (pid N)" where Linux tells, else ""."""
    inode = f":{os.fstat(fd).st_ino}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            fields = line.split()  # 1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> ...
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].endswith(inode):
                return f" (pid {fields[4]})"
    return ""


def resume_hint(run_dir: Path, resumable: bool = True, deployed: bool = False) -> str:
    """What continues an interrupted or failed run; `deployed`: a Flower deployment, which
    resumes through its run config (pneumonia.flower.server_app)."""
    if not resumable:
        return f"start the run again (remove {run_dir} first)"
    if deployed:
        return f"continue with flwr run APP_DIR CONNECTION --run-config \"resume='{run_dir}'\""
    return f"continue with python -m pneumonia.fit --resume {run_dir}"


def is_complete(run_dir: Path, changes: list[str]) -> bool:
    """A finished run (summary.json is its last write) that a resume would not train longer:
    resuming it has nothing to do."""
    longer = any(change.split(" ", 1)[0] in LONGER for change in changes)
    return (run_dir / SUMMARY).is_file() and not longer


def record_config(run_dir: Path, config_yaml: str) -> None:
    """Keep the config the checkpoints are trained under, for `check_resume_config`."""
    checkpoints_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_text_atomic(checkpoints_dir(run_dir) / TRAINED_UNDER, config_yaml)


def check_resume_config(run_dir: Path, config_yaml: str) -> list[str]:
    """Refuse a resume whose config.yaml was edited since the run started, naming the keys,
    and a longer run (LONGER) that would not continue the one trained, saying why; return
    the changes accepted ("key old -> new"). Runs from before the record was kept are not
    checked, and cannot be trained longer: nothing says what they were trained under."""
    recorded = checkpoints_dir(run_dir) / TRAINED_UNDER
    if not recorded.is_file():
        _refuse_longer_unrecorded(run_dir, config_yaml)
        return []
    old, new = _flat(yaml.safe_load(recorded.read_text())), _flat(yaml.safe_load(config_yaml))
    # An option added to the package since the run started, at its default, is no edit.
    missing = new.keys() - old.keys()
    added = {k for k in missing if new[k] == _defaults().get(k, object())} if missing else set()
    changed = sorted(k for k in old.keys() | new.keys() - added if old.get(k) != new.get(k))
    unsafe = [k for k in changed if k not in SAFE_CHANGES | LONGER]
    if unsafe:
        shown = ", ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in unsafe[:4])
        raise UserError(
            f"{run_dir / CONFIG} was edited since the run started ({shown}): a resumed "
            f"run trains under its own config; undo the edit, or start a new run with it "
            f"(a resume may change only {', '.join(sorted(SAFE_CHANGES))}, and raise "
            f"federated.rounds or trainer.max_epochs where no schedule depends on them)"
        )
    for key in sorted(LONGER.intersection(changed)):
        if why := why_not_longer(key, old, new):
            raise UserError(
                f"{run_dir} cannot resume with {key} {old.get(key)} -> {new.get(key)}: {why}"
            )
    return [f"{k} {old.get(k)} -> {new.get(k)}" for k in changed]


def _refuse_longer_unrecorded(run_dir: Path, config_yaml: str) -> None:
    written = Path(run_dir) / CONFIG
    if not written.is_file():
        return
    old, new = _flat(yaml.safe_load(written.read_text())), _flat(yaml.safe_load(config_yaml))
    if any(old.get(key) != new.get(key) for key in LONGER):
        raise UserError(
            f"{run_dir} was written before runs recorded the config their checkpoints were "
            f"trained under, so it cannot be trained longer: start a new run with more "
            f"rounds or epochs"
        )


def trained_under(run_dir: Path, key: str) -> object:
    """`key`'s value in the config the checkpoints were trained under (None if not kept)."""
    recorded = checkpoints_dir(run_dir) / TRAINED_UNDER
    if not recorded.is_file():
        return None
    return _flat(yaml.safe_load(recorded.read_text())).get(key)


def keep_resume_config(run_dir: Path, config_yaml: str) -> None:
    """A resume given more rounds or epochs on its command line writes them into config.yaml,
    so that a plain `--resume RUN_DIR` after an interruption continues the longer run."""
    path = Path(run_dir) / CONFIG
    written, given = _flat(yaml.safe_load(path.read_text())), _flat(yaml.safe_load(config_yaml))
    if any(written.get(key) != given.get(key) for key in LONGER):
        write_text_atomic(path, config_yaml)


@functools.cache  # parsing costs seconds; the defaults do not change within a process
def _defaults() -> dict:
    """Every fit option at its default, flattened ("data.roi": "full", ...)."""
    return _flat(yaml.safe_load(parse_fit_config([])[1]))


def why_not_longer(key: str, old: dict, new: dict) -> str | None:
    """Why a resume cannot train the run longer (`key`: federated.rounds or
    trainer.max_epochs raised from `old`'s to `new`'s flat config), in words ending with what
    to do; None when it can: the epochs or rounds already trained are then those of a run
    planned that long from the start (learning rates, privacy noise, image sizes)."""
    before, after = old.get(key), new.get(key)
    unit = "rounds" if key == "federated.rounds" else "epochs"
    fresh = f"start a new run with --{key} {after}"
    if not isinstance(after, int) or not isinstance(before, int) or after < before:
        return f"a resume can add {unit}, not take them away: {fresh}"
    if key == "trainer.max_epochs" and new.get("federated.enabled"):
        return "a federated run trains federated.local_epochs per round: raise federated.rounds"
    if new.get("data.progressive.start_size"):
        return f"data.progressive spreads its image sizes over the planned {before} {unit}: {fresh}"
    if new.get("privacy.enabled") and new.get("privacy.target_epsilon") is not None:
        return (
            f"privacy.target_epsilon {new['privacy.target_epsilon']} set the noise for the "
            f"planned {before} {unit} and that budget is spent: {fresh} (a run given "
            f"privacy.noise_multiplier instead may train longer, its epsilon growing)"
        )
    if key == "federated.rounds":
        return _round_rates_fixed(before, after, new)
    return _epoch_rates_fixed(before, after, new)


def _decay_config(flat: dict) -> DecayConfig:
    """optim.decay.* of a flat config (the defaults where an older config lacks a key)."""
    names = {f.name for f in dataclasses.fields(DecayConfig)}
    prefix = "optim.decay."
    given = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    return DecayConfig(**{k: v for k, v in given.items() if k in names})


def _same_rates(name: str, before: int, after: int, flat: dict) -> bool:
    """Whether decay `name` gives units 0..before-1 the same factor in a schedule of `after`
    units as in one of `before`."""
    decay, seed = _decay_config(flat), int(flat.get("seed") or 0)
    return all(
        decay_factor(name, t, before, decay, seed) == decay_factor(name, t, after, decay, seed)
        for t in range(before)
    )


def _round_rates_fixed(before: int, after: int, new: dict) -> str | None:
    name = str(new.get("federated.round_lr", "constant"))
    if _same_rates(name, before, after, new):
        return None
    return (
        f"federated.round_lr {name} decays over the planned {before} rounds, so more rounds "
        f"would change the rates rounds 1-{before} trained at: start a new run with "
        f"--federated.rounds {after} (a resume adds rounds under round_lr constant, or a "
        f"decay given optim.decay.decay_steps)"
    )


def _epoch_rates_fixed(before: int, after: int, new: dict) -> str | None:
    fresh = f"start a new run with --trainer.max_epochs {after}"
    if new.get("optim.weight_averaging") == "swa":
        return (
            f"optim.weight_averaging swa starts at a share of the planned {before} epochs: {fresh}"
        )
    name = str(new.get("optim.scheduler", "none"))
    if name in UNPLANNED_SCHEDULERS:
        return None
    by_epoch = new.get("optim.interval", "epoch") == "epoch" and name != "onecycle"
    if by_epoch and not _torch_cosine(new) and _same_rates(name, before, after, new):
        return None
    return (
        f"optim.scheduler {name} decays over the planned {before} epochs, so more epochs "
        f"would change the rates epochs 1-{before} trained at: {fresh} (a resume adds epochs "
        f"under optim.scheduler none, step or plateau, or a decay by epoch given "
        f"optim.decay.decay_steps)"
    )


def _torch_cosine(flat: dict) -> bool:
    """torch's CosineAnnealingLR (pneumonia.training.module.make_scheduler), whose planned
    length a resumed Trainer restores from the checkpoint."""
    return (
        flat.get("optim.scheduler") == "cosine"
        and not flat.get("optim.decay.warmup")
        and not flat.get("optim.decay.decay_steps")
    )


def _flat(tree: object, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out |= _flat(value, f"{prefix}{key}.")
    return out


def remove_temporary_files(run_dir: Path) -> int:
    """Delete what writes killed mid-way left (`.NAME.tmp`, `.NAME.PID.tmp`); their count."""
    stale = [p for p in run_dir.rglob(".*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def write_split_table(path: Path, parts: dict[str, ImageSet | None]) -> None:
    """One row per image: split, class, patient, name."""
    rows = [
        {"split": split, "class": images.classes[label], "patient": patient, "name": name}
        for split, images in parts.items()
        if images is not None
        for label, patient, name in zip(
            images.labels.tolist(), images.patients, images.names, strict=True
        )
    ]
    write_csv(path, rows)
