"""Faults as a careful user and a security reviewer meet them: one row per case, the command,
its exit code and the last line it printed to stderr (or what it left behind).

    python bench/faults.py                      # this checkout
    PYTHONPATH=/path/to/older/checkout python bench/faults.py --label before

Every case runs `python -m pneumonia.*` in a fresh temporary folder with tiny synthetic runs
(32 px, width 16), so the table takes a few minutes. Print-out: a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TINY = [
    "--data.image_size", "32",
    "--data.synthetic.n_patients", "60",
    "--data.batch_size", "16",
    "--model.name", "resnet18",
    "--model.width", "16",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
CENTRAL = [*TINY, "--federated.enabled", "false", "--optim.scheduler", "cosine"]
FEDERATED = [*TINY, "--federated.enabled", "true", "--federated.local_epochs", "1"]
# A hostile client for either version of the code: client 0 sends global + 1e6 x its update
# (or claims 1e9 images), patched in before the command runs.
HOSTILE = """
import runpy, sys
from pneumonia.federated import cohort
original = cohort.run_client_round
def hostile(client, strategy, task):
    update = original(client, strategy, task)
    if client.index == 0:
        g = task.global_state
        if {scale} != 1:
            for k, v in g.items():
                if v.is_floating_point():
                    update.state[k] = g[k] + {scale} * (update.state[k] - g[k])
        update.n = {claimed} or update.n
    return update
cohort.run_client_round = hostile
sys.argv = ["pneumonia.fit", *sys.argv[1:]]
runpy.run_module("pneumonia.fit", run_name="__main__")
"""


class Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def run(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, *argv], cwd=cwd, capture_output=True, text=True, env=env, timeout=600
    )
    return proc.returncode, last_line(proc.stderr)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:230] if lines else ""


def fit(argv: list[str], cwd: Path, env: dict | None = None) -> tuple[int, str]:
    return run(["-m", "pneumonia.fit", *argv], cwd, env)


def killed(argv: list[str], cwd: Path, wait_for: Path, signum: int) -> tuple[int, str]:
    """fit in a real process, sent `signum` once `wait_for` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pneumonia.fit", *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not wait_for.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, last_line(err)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def rows(path: Path) -> int:
    with path.open() as file:
        return len(list(csv.DictReader(file)))


def cases(tmp: Path):
    """(class, case, command, run) for every case; run() returns (exit code, what it shows)."""
    ref = tmp / "ref"

    def reference():
        if not ref.exists():
            fit([*CENTRAL, "--trainer.max_epochs", "3", "--run_dir", str(ref)], tmp)
        return ref

    def copy(name: str) -> Path:
        subprocess.run(["cp", "-r", str(reference()), str(tmp / name)], check=True)
        return tmp / name

    def crafted_resume():
        run_dir = copy("crafted")
        marker = tmp / "pwned"
        torch.save({"epoch": 0, "x": Payload(marker)}, run_dir / "checkpoints" / "last.ckpt")
        env = os.environ | {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        code, line = fit(["--resume", str(run_dir)], tmp, env)
        return code, f"payload ran: {marker.exists()}; {line}"

    def crafted_pretrained():
        marker, path = tmp / "pwned2", tmp / "weights.pth"
        torch.save({"x": Payload(marker)}, path)
        env = os.environ | {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        code, line = fit([*CENTRAL, "--model.pretrained", str(path)], tmp, env)
        return code, f"payload ran: {marker.exists()}; {line}"

    def sigterm(kind: str, signum: int):
        def case():
            run_dir = tmp / f"sig-{kind}-{signum}"
            if kind == "central":
                argv, done = [*CENTRAL, "--trainer.max_epochs", "6"], "last.ckpt"
            else:
                argv, done = [*FEDERATED, "--federated.rounds", "6"], "federated_state.pt"
            argv += ["--run_dir", str(run_dir)]
            return killed(argv, tmp, run_dir / "checkpoints" / done, signum)

        return case

    def exact_resume():
        run_dir = tmp / "resumed"
        argv = [*CENTRAL, "--trainer.max_epochs", "3", "--run_dir", str(run_dir)]
        killed(argv, tmp, run_dir / "checkpoints" / "last.ckpt", signal.SIGTERM)
        code, _ = fit(["--resume", str(run_dir)], tmp)
        a, b = weights(run_dir), weights(reference())
        differ = sum(not torch.equal(a[k], b[k]) for k in a)
        metrics = f"{rows(run_dir / 'metrics.csv')} of {rows(ref / 'metrics.csv')} rows"
        return code, f"{differ} of {len(a)} tensors differ; metrics.csv {metrics}"

    def finished_resume():
        run_dir = copy("finished")
        before = rows(run_dir / "metrics.csv")
        code, line = fit(["--resume", str(run_dir)], tmp)
        path = run_dir / "metrics.csv"
        return code, f"metrics.csv rows {before} -> {rows(path) if path.exists() else 'deleted'}"

    def edited(old: str, new: str):
        def case():
            run_dir = copy(f"edited-{new.split(':')[0]}")
            config = run_dir / "config.yaml"
            config.write_text(config.read_text().replace(old, new, 1))
            return fit(["--resume", str(run_dir)], tmp)

        return case

    def a_file_as(key: str):
        def case():
            blocker = tmp / "blocker"
            blocker.write_text("")
            extra = ["--data.root", str(images())] if key == "data.cache_dir" else []
            return fit([*CENTRAL, *extra, f"--{key}", str(blocker / "sub")], tmp)

        return case

    def images() -> Path:
        root = tmp / "xray"
        if not root.exists():
            import numpy as np
            from PIL import Image

            for cls, mean in (("NORMAL", 60), ("PNEUMONIA", 180)):
                (root / cls).mkdir(parents=True)
                for p in range(8):
                    pixels = np.full((40, 40), mean, np.uint8)
                    name = (
                        f"IM-{p:04d}-0001.jpeg" if cls == "NORMAL" else f"person{p}_virus_{p}.jpeg"
                    )
                    Image.fromarray(pixels).save(root / cls / name)
        return root

    def animated():
        from PIL import Image

        root = images()
        frame = Image.effect_noise((40, 40), 40)  # two different frames: PIL merges equal ones
        other = frame.rotate(90)
        frame.save(root / "NORMAL" / "IM-0099-0001.gif", save_all=True, append_images=[other])
        code, line = fit([*CENTRAL, "--data.root", str(root)], tmp)
        (root / "NORMAL" / "IM-0099-0001.gif").unlink()
        return code, line

    def yaml_file(text: str):
        def case():
            path = tmp / "bad.yaml"
            path.write_text(text)
            return fit(["--config", str(path)], tmp)

        return case

    def foreign_checkpoint():
        path = tmp / "foreign.ckpt"
        torch.save({"hyper_parameters": {"model": 3}, "state_dict": {}}, path)
        return run(
            ["-m", "pneumonia.evaluate", "--ckpt", str(path), "--data.root", str(images())], tmp
        )

    def nan_checkpoint():
        ckpt = torch.load(reference() / "checkpoints" / "best.ckpt", weights_only=True)
        key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
        ckpt["state_dict"][key].fill_(float("nan"))
        path = tmp / "nan.ckpt"
        torch.save(ckpt, path)
        return run(
            ["-m", "pneumonia.evaluate", "--ckpt", str(path), "--data.root", str(images())], tmp
        )

    def hostile(scale: float, claimed: int):
        def case():
            run_dir = tmp / f"hostile-{scale}-{claimed}"
            code = HOSTILE.format(scale=scale, claimed=claimed)
            argv = [*FEDERATED, "--federated.rounds", "2", "--run_dir", str(run_dir)]
            status, line = run(["-c", code, *argv], tmp)
            if not (run_dir / "rounds.csv").exists():
                return status, line
            with (run_dir / "rounds.csv").open() as file:
                last = list(csv.DictReader(file))[-1]
            return status, (
                f"round 2: excluded [{last.get('excluded', '')}], global val loss "
                f"{float(last['val_loss']):.3g}"
            )

        return case

    def experiment_path():
        code, line = fit([*CENTRAL, "--experiment", "../../escaped", "--runs_root", "r/runs"], tmp)
        return code, f"{line} | written outside runs_root: {(tmp / 'escaped').exists()}"

    def temporary_files():
        run_dir = copy("tmpfiles")
        (run_dir / "checkpoints" / ".last.ckpt.99.tmp").write_bytes(b"half")
        code, _ = fit(["--resume", str(run_dir)], tmp)
        return code, f".tmp files left: {len(list(run_dir.rglob('*.tmp')))}"

    yield (
        "1 code from a checkpoint",
        "crafted last.ckpt, env forces unsafe loads",
        "fit --resume RUN",
        crafted_resume,
    )
    yield (
        "1 code from a checkpoint",
        "crafted pretrained weights, same env",
        "fit --model.pretrained F",
        crafted_pretrained,
    )
    yield (
        "2 interruptions",
        "SIGTERM, centralized",
        "fit TINY (kill -TERM)",
        sigterm("central", signal.SIGTERM),
    )
    yield (
        "2 interruptions",
        "SIGTERM, federated",
        "fit TINY federated (kill -TERM)",
        sigterm("fl", signal.SIGTERM),
    )
    yield (
        "2 interruptions",
        "SIGINT (Ctrl-C), centralized",
        "fit TINY (kill -INT)",
        sigterm("central", signal.SIGINT),
    )
    yield (
        "3 resume",
        "killed after epoch 1, resumed vs uninterrupted",
        "fit --resume RUN",
        exact_resume,
    )
    yield "3 resume", "resume a finished centralized run", "fit --resume RUN", finished_resume
    yield (
        "3 resume",
        "config.yaml edited: learning rate",
        "fit --resume RUN",
        edited("lr: 0.002", "lr: 0.02"),
    )
    yield (
        "3 resume",
        "config.yaml edited: width",
        "fit --resume RUN",
        edited("width: 16", "width: 8"),
    )
    yield "4 one line", "runs_root is a file", "fit --runs_root FILE/sub", a_file_as("runs_root")
    yield (
        "4 one line",
        "data.cache_dir is a file",
        "fit --data.cache_dir FILE/sub",
        a_file_as("data.cache_dir"),
    )
    yield "4 one line", "a two-frame GIF among the images", "fit --data.root DIR", animated
    yield (
        "4 one line",
        "data.batch_size 0",
        "fit --data.batch_size 0",
        lambda: fit([*CENTRAL, "--data.batch_size", "0"], tmp),
    )
    yield (
        "4 one line",
        "optim.lr -1",
        "fit --optim.lr -1",
        lambda: fit([*CENTRAL, "--optim.lr", "-1"], tmp),
    )
    yield (
        "4 one line",
        "trainer.accelerator gpu on a CPU machine",
        "fit --trainer.accelerator gpu",
        lambda: fit([*CENTRAL, "--trainer.accelerator", "gpu"], tmp),
    )
    yield "4 one line", "YAML that is a list", "fit --config list.yaml", yaml_file("- a\n- b\n")
    yield "4 one line", "empty YAML", "fit --config empty.yaml", yaml_file("")
    yield (
        "4 one line",
        "checkpoint with foreign hyper-parameters",
        "evaluate --ckpt F",
        foreign_checkpoint,
    )
    yield (
        "5 accepted although wrong",
        "synthetic pneumonia_fraction 1",
        "fit --data.synthetic.pneumonia_fraction 1",
        lambda: fit([*CENTRAL, "--data.synthetic.pneumonia_fraction", "1"], tmp),
    )
    yield (
        "5 accepted although wrong",
        "augment.scale_min above scale_max",
        "fit --data.augment.scale_min 1.5",
        lambda: fit([*CENTRAL, "--data.augment.scale_min", "1.5"], tmp),
    )
    yield (
        "5 accepted although wrong",
        "trainer.max_epochs 0",
        "fit --trainer.max_epochs 0",
        lambda: fit([*CENTRAL, "--trainer.max_epochs", "0"], tmp),
    )
    yield (
        "6 hostile updates",
        "client 0 sends 1e6 x its update (FedAvg)",
        "fit federated, 2 rounds",
        hostile(1e6, 0),
    )
    yield (
        "6 hostile updates",
        "client 0 claims 10^9 images",
        "fit federated, 2 rounds",
        hostile(1, 10**9),
    )
    yield (
        "6 hostile updates",
        "evaluate a checkpoint with NaN weights",
        "evaluate --ckpt F",
        nan_checkpoint,
    )
    yield "7 paths", "--experiment ../../escaped", "fit --experiment ../../escaped", experiment_path
    yield "7 paths", "a killed write's .tmp file, then resume", "fit --resume RUN", temporary_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="column label (before / after)")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()
    print(f"| class | case | command | {args.label}: exit | {args.label}: what it shows |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="faults-") as folder:
        for kind, name, command, case in cases(Path(folder)):
            if args.only and args.only not in name:
                continue
            code, shown = case()
            shown = shown.replace("|", "/").replace(folder, "$TMP")
            print(f"| {kind} | {name} | `{command}` | {code} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
