"""Run a comparison's entries one after another as training jobs, skipping those already finished
with the same resolved config and resuming one that was interrupted."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from pneumonia.compare.plan import Comparison, Entry, config_hash
from pneumonia.core.errors import UserError
from pneumonia.core.interrupt import Interrupted
from pneumonia.run.config import parse_fit_config
from pneumonia.run.job import run_job
from pneumonia.run.progress import duration
from pneumonia.run.rundir import CONFIG, SUMMARY, last_checkpoint, locked, round_state

DONE, PARTIAL, STALE, NEW = "done", "partial", "stale", "new"


def entry_status(entry: Entry) -> str:
    """done: summary.json under the same config; partial: resumable (a saved epoch or round);
    stale: trained under another config; new: nothing usable."""
    config = entry.run_dir / CONFIG
    if not config.is_file():
        return NEW
    if config_hash(config.read_text()) != entry.key:
        return STALE
    if (entry.run_dir / SUMMARY).is_file():
        return DONE
    resumable = round_state if entry.federated else last_checkpoint
    return PARTIAL if resumable(entry.run_dir).is_file() else NEW


class ComparisonProgress:
    """`entry i/n, its epoch or round, elapsed, about how long is left` on one line.

    The estimate assumes every pass over the training images costs what the passes trained so
    far in this process cost on average, so it is rough when models differ in speed."""

    def __init__(self, comparison: Comparison, to_run: list[Entry]) -> None:
        self.comparison = comparison
        self.left = sum(e.budget for e in to_run)  # passes still to train
        self.trained = 0.0
        self.started = time.time()
        self.entry: Entry | None = None
        self.entry_done = 0.0

    def start(self, entry: Entry, note: str = "") -> None:
        self.entry, self.entry_done = entry, 0.0
        kind = "federated" if entry.federated else "centralized"
        unit = "rounds" if entry.federated else "epochs"
        print(f"\n{self.prefix()}: {entry.label}, {kind}, {entry.steps} {unit}{note}", flush=True)

    def __call__(self, done: int, total: int) -> None:
        """The run's progress hook: `done` of `total` epochs or rounds of the current entry."""
        assert self.entry is not None
        passes = self.entry.budget * done / total
        self.trained += passes - self.entry_done
        self.left -= passes - self.entry_done
        self.entry_done = passes
        unit = "round" if self.entry.federated else "epoch"
        # tqdm.write keeps the line apart from Lightning's progress bar on the terminal.
        tqdm.write(f"{self.prefix()}: {unit} {done}/{total}")
        sys.stdout.flush()

    def finish(self) -> None:
        """The entry ended (maybe early, by resuming): count its whole budget as done."""
        assert self.entry is not None
        self.left -= self.entry.budget - self.entry_done
        self.entry_done = self.entry.budget

    def prefix(self) -> str:
        entries = self.comparison.entries
        i = entries.index(self.entry) + 1 if self.entry else 0
        elapsed = time.time() - self.started
        rate = elapsed / self.trained if self.trained else float("nan")
        return (
            f"[{self.comparison.name} {i}/{len(entries)} {self.entry.name if self.entry else ''}"
            f" | {duration(elapsed)} elapsed, about {duration(rate * max(self.left, 0))} left]"
        )


def run_comparison(comparison: Comparison, force: bool = False) -> list[Entry]:
    """Train every entry that needs it; return the entries (all finished)."""
    status = {e.name: entry_status(e) for e in comparison.entries}
    if force:  # a run under another config is still kept aside, never deleted
        status = {name: STALE if s == STALE else NEW for name, s in status.items()}
    to_run = [e for e in comparison.entries if status[e.name] != DONE]
    cached = len(comparison.entries) - len(to_run)
    print(
        f"comparison {comparison.name}: {len(comparison.entries)} entries, {cached} already "
        f"finished with the same config, {len(to_run)} to train",
        flush=True,
    )
    progress = ComparisonProgress(comparison, to_run)
    for entry in to_run:
        run_entry(entry, status[entry.name], progress)
    return comparison.entries


def run_entry(entry: Entry, status: str, progress: ComparisonProgress) -> None:
    if status == PARTIAL:
        progress.start(entry, note=f" (resuming {entry.run_dir})")
        argv = ["--resume", str(entry.run_dir)]
    else:
        clear_run_dir(entry, status)
        progress.start(entry)
        argv = entry.argv
    try:
        cfg, config_yaml, resume = parse_fit_config(argv)
        run_job(cfg, config_yaml, resume, progress)  # UserErrors reach us, to name the entry
    except UserError as err:
        raise UserError(f"entry {entry.name!r}: {err}") from None
    except Interrupted as err:
        raise Interrupted(
            err.signum,
            f"entry {entry.name!r}: {err.saved}",
            "run the same command again to continue from there",
        ) from None
    progress.finish()


def clear_run_dir(entry: Entry, status: str) -> None:
    """Make room for a fresh run. A run made under another config is kept beside it, not
    deleted: it may have cost hours."""
    path = entry.run_dir
    if not path.exists():
        return
    config = path / CONFIG
    # Not while another process writes it: a fit of it may be running beside the comparison.
    with locked(path, "wait for it to end (or stop it), then run the comparison again"):
        if status == STALE:
            kept = unused_path(
                path.with_name(f"{path.name}.replaced-{config_hash(config.read_text())}")
            )
            path.rename(kept)
            print(f"{path}: config changed, the old run moved to {kept}", flush=True)
        else:
            shutil.rmtree(path)  # --force on the same config, or a run without a finished epoch


def unused_path(path: Path) -> Path:
    candidate, i = path, 1
    while candidate.exists():
        candidate, i = path.with_name(f"{path.name}.{i}"), i + 1
    return candidate
