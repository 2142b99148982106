"""federated.engine simulation: the same federated job with its clients in Ray workers of
Flower's simulation runtime, against the in-process loop.

One scenario (module fixture), because Ray's start-up costs seconds: the in-process run of
3 rounds; the same run on the engine, stopped by SIGTERM while its round 2 trains (a real
process), then resumed with --resume. The resumed run must equal the uninterrupted in-process
one bit for bit (each client trains with the seed of its (round, client) on one torch thread,
updates travel as exact float32 arrays and the server averages them in client order), and
the stopped one must leave no Ray process behind. Client 2 sends a hostile update that the
norm check leaves out, on both engines alike.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from pneumonia import fit
from pneumonia.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--config", str(ROOT / "configs" / "default.yaml"),
    "--federated.clients", "3",
    "--federated.rounds", "3",
    "--federated.local_epochs", "1",
    "--federated.hostile.client", "2",
    "--federated.hostile.scale", "100",
    "--federated.keep_optimizer_state", "true",  # client state that must survive the resume
    "--data.image_size", "32",
    "--model.width", "16",
    "--data.synthetic.n_patients", "40",
    "--trainer.enable_progress_bar", "false",
    "--figures_every", "0",
]  # fmt: skip
SIMULATION = [*TINY, "--federated.engine", "simulation"]
TIMED = {"wall_time_s", "run_dir", "round_s", "elapsed_s"}  # what differs from run to run
# The engine's run in its own process, stopped by SIGTERM 0.3 s into round 2, while its
# clients train in Ray's workers.
STOPPED_IN_ROUND_2 = """
import os, signal, sys, threading
from pneumonia.flower.simulation import SimulatedCohort
from pneumonia import fit

train_round = SimulatedCohort.train_round

def stopped(self, chosen, task):
    if task.round_index == 1:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
    return train_round(self, chosen, task)

SimulatedCohort.train_round = stopped
fit.main(sys.argv[1:])
"""


@pytest.fixture
def task_identity():
    """Messages made outside a Flower process need a task identity (the ServerApp has one)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    forget_task_identity()


def forget_task_identity() -> None:
    """What the simulation's run sets in this process, undone for the tests that follow."""
    TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Ray's services and workers)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "rounds.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMED} for row in csv.DictReader(f)]


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as patch:  # no decoded-image cache of the user's
        patch.setenv("PNEUMONIA_CACHE", str(root / "cache"))
        return run_scenario(root)


def run_scenario(root: Path) -> dict:
    # One torch thread, as each engine worker has (federated.client_cpus 1): oneDNN's float
    # sums depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = fit.run([*TINY, "--run_dir", str(root / "local")])
    finally:
        torch.set_num_threads(threads)
    run_dir = root / "simulation"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [*SIMULATION, "--run_dir", str(run_dir)]
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPED_IN_ROUND_2, *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    state = run_dir / "checkpoints" / "federated_state.pt"
    ray: set[int] = set()
    while proc.poll() is None and time.time() < started + 240:
        if state.exists():  # round 2 runs: Ray and its workers are up
            ray |= descendants(proc.pid)
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60)
    stopped = {"code": proc.returncode, "err": err.strip().splitlines(), "ray": ray}
    stopped["left"] = {pid for pid in ray if alive(pid)}
    stopped["rounds"] = rows(run_dir) if (run_dir / "rounds.csv").exists() else []
    try:
        resumed = fit.run(["--resume", str(run_dir)])
    finally:
        forget_task_identity()
    return {"local": local, "stopped": stopped, "resumed": resumed, "run_dir": run_dir}


def test_a_signal_stops_the_engine_with_the_usual_line_and_no_process_left(scenario):
    stopped, run_dir = scenario["stopped"], scenario["run_dir"]
    assert stopped["code"] == 143, stopped["err"][-5:]
    # Round 1, unless a fast machine finished round 2 within the 0.3 s.
    saved = "round 1 is" if len(stopped["rounds"]) == 1 else "rounds 1-2 are"
    assert stopped["err"][-1] == (
        f"interrupted by SIGTERM: {saved} saved in {run_dir}: continue with python -m "
        f"pneumonia.fit --resume {run_dir}"
    )
    assert len(stopped["rounds"]) in (1, 2)
    assert stopped["ray"], "no Ray process was seen"
    assert not stopped["left"], "Ray processes outlived the run"


def test_the_resumed_engine_run_equals_the_in_process_loop(scenario):
    local_dir, run_dir = Path(scenario["local"]["run_dir"]), scenario["run_dir"]
    assert rows(run_dir) == rows(local_dir)  # every round's figures, hostile client left out
    assert [row["excluded"] for row in rows(run_dir)] == ["2", "2", "2"]
    for name in ("last.ckpt", "best.ckpt"):
        ours, theirs = (
            weights(run_dir / "checkpoints" / name),
            weights(local_dir / "checkpoints" / name),
        )
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}: {key}"
    summary = json.loads((run_dir / "summary.json").read_text())
    local = json.loads((local_dir / "summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in TIMED} == {
        k: v for k, v in local.items() if k not in TIMED
    }
    assert scenario["resumed"]["run_dir"] == str(run_dir)


def same(a, b) -> bool:
    """Equal nested dicts, lists and tensors."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_the_clients_keep_their_state_and_folders_as_in_process(scenario):
    local_dir, run_dir = Path(scenario["local"]["run_dir"]), scenario["run_dir"]
    ours, theirs = (
        torch.load(d / "checkpoints" / "federated_state.pt", weights_only=True)["clients"]
        for d in (run_dir, local_dir)
    )
    assert same(ours, theirs)  # each client's optimizer state and step count
    assert ours[0]["optimizer_state"]["state"] and ours[0]["steps"] > 0
    for j in range(3):
        assert (run_dir / "clients" / f"client_{j}" / "hparams.yaml").is_file()


# -- refusals, each one line before anything starts -------------------------------------------


def fit_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        fit.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_missing_ray_says_what_to_install(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    line = fit_error([*SIMULATION, "--run_dir", str(tmp_path / "run")], capsys)
    assert line == (
        "error: federated.engine simulation needs ray, which is not installed: pip install "
        "'pneumonia[simulation]' (or set federated.engine local)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("extra", "start"),
    [
        (["--federated.hold_out", "0"], "error: federated.site_shift, sites_shift, hold_out"),
        (["--federated.cross_site", "true"], "error: federated.site_shift, sites_shift, hold_out"),
        (["--federated.enabled", "false"], "error: federated.engine simulation trains a fed"),
        (["--federated.partition", "sites"], "error: federated.partition sites makes one"),
        (["--federated.secure_aggregation", "true"], "error: federated.secure_aggregation"),
        (["--trainer.accelerator", "gpu"], "error: trainer.accelerator gpu trains every client"),
        (["--federated.client_cpus", "4096"], "error: federated.client_cpus 4096 is more than"),
    ],
)
def test_what_only_the_local_loop_does_is_refused(extra, start, capsys, tmp_path):
    line = fit_error([*SIMULATION, *extra, "--run_dir", str(tmp_path / "run")], capsys)
    assert line.startswith(start)
    assert not (tmp_path / "run").exists()


def test_a_job_without_the_engine_refuses_it(tmp_path):
    """A comparison's entries run jobs directly (no engine there): refused, not run locally."""
    from pneumonia.run.config import parse_fit_config
    from pneumonia.run.job import run_job

    cfg, config_yaml, _ = parse_fit_config([*SIMULATION, "--run_dir", str(tmp_path / "run")])
    with pytest.raises(UserError, match="federated.engine simulation runs from python -m"):
        run_job(cfg, config_yaml)


def test_a_deployment_refuses_the_engine():
    from pneumonia.flower.server_app import serve

    overrides = " ".join(SIMULATION[2:])
    with pytest.raises(UserError, match="a deployment's clients are its SuperNodes"):
        serve(None, {"config": TINY[1], "overrides": overrides})  # type: ignore[arg-type]


def test_a_client_that_raises_leaves_with_the_in_process_loop_line(task_identity):
    from flwr.app import Message, RecordDict

    from pneumonia.flower.simulation import local_faults

    def train(msg, context):
        raise RuntimeError("disk full at hospital 1\nmore")

    msg = Message(RecordDict(), dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "1"  # as if it had been sent
    reply = local_faults(msg, None, train)
    assert reply.has_error()
    assert reply.error.reason == "raised RuntimeError: disk full at hospital 1"


def test_the_parallel_clients_bench_runs_its_quick_mode(capsys, monkeypatch):
    """bench/parallel_clients.py still reaches its figures (not checked: timings are bench
    output); it lives here with the suite's other runs of Ray."""
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "argv", ["parallel_clients", "--quick", "--clients", "3"])
    threads = torch.get_num_threads()
    try:
        importlib.import_module("parallel_clients").main()
    finally:
        torch.set_num_threads(threads)
        forget_task_identity()
    out = capsys.readouterr().out
    assert "3 clients x 1 round x 1 local epochs" in out
    assert "in-process / engine wall time: " in out and "round time, in-process / engine: " in out
    difference = float(out.split("max |global weights, in-process - engine|: ")[1].split()[0])
    assert difference < 1e-4  # float rounding of another thread count, no more


def test_the_client_state_and_log_folder_travel_only_for_the_engine():
    """The engine's server sends each client its state (b"": none yet) and folder and gets
    the new state back; a deployment's messages carry neither (its nodes keep their own)."""
    from pneumonia.federated.aggregate import ClientUpdate
    from pneumonia.federated.cohort import RoundTask
    from pneumonia.flower import wire
    from pneumonia.training.recipe import Recipe

    state = {"w": torch.arange(4.0)}
    task = RoundTask(state, round_index=1, local_epochs=1, lr=0.001)
    recipe = Recipe(model={"name": "se_resnet18"}, optim={}, image_size=32, mean=0.5)
    for kept, folder in ((b"\x00state", "/runs/x/clients"), (b"", "/runs/x/clients")):
        sent = wire.TrainRequest(task, 2, "seed: 0\n", recipe, False, kept, folder)
        got = wire.read_train_request(wire.train_request(sent))
        assert (got.client_state, got.log_dir) == (kept, folder)
    plain = wire.read_train_request(
        wire.train_request(wire.TrainRequest(task, 2, "seed: 0\n", recipe, False))
    )
    assert (plain.client_state, plain.log_dir) == (None, "")
    update = ClientUpdate(client=2, state=state, n=5, train_loss=0.5, train_accuracy=0.5)
    assert wire.read_client_state(wire.train_reply(update, None, b"new")) == b"new"
    assert wire.read_client_state(wire.train_reply(update)) is None
