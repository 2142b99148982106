"""A real federation on loopback: a SuperLink and two SuperNodes as processes, over TLS.

One scenario (module fixture) drives every acceptance point, because each Flower round costs
seconds of process start-up: round 1 runs normally; in round 2 SuperNode 1 is killed (SIGKILL,
a crash: Flower notices two missed heartbeats, 20 s with the tests' 10 s beat) and the round
completes with client 0 (min_clients 1); in round 3 SuperNode 0 is stopped too (SIGTERM) and
the round fails; both nodes are restarted and the run resumes round 3.
"""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from pneumonia import fit
from pneumonia.flower.launch import Federation, threads_per_node

TINY = [
    "--config", str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml"),
    "--federated.clients", "2",
    "--federated.rounds", "3",
    "--federated.local_epochs", "1",
    "--federated.min_clients", "1",
    "--data.image_size", "32",
    "--model.width", "16",
    "--data.synthetic.n_patients", "60",
]  # fmt: skip
GLOBAL = ["train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall", "val_f1"]
GLOBAL += ["val_specificity", "val_auroc", "client0_n", "client0_loss", "client1_n"]
ROUND_TIMEOUT_S = 240
# SuperNodes beat every 10 s (pneumonia.flower.quick_supernode): a killed one is noticed
# after two missed beats, 20 s, not Flower's 60.
QUICK_HEARTBEAT_S = 10


def read_rounds(run_dir: Path) -> list[dict]:
    path = run_dir / "rounds.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def wait_for_rounds(run_dir: Path, n: int, thread: threading.Thread) -> None:
    deadline = time.time() + ROUND_TIMEOUT_S
    while len(read_rounds(run_dir)) < n:
        assert thread.is_alive(), f"the run ended before round {n}"
        assert time.time() < deadline, f"round {n} did not finish in {ROUND_TIMEOUT_S} s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("flower")
    # Each node runs threads_per_node(2) torch threads; oneDNN's float sums depend on the
    # thread count, so the reference runs with as many.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_node(2))
    try:
        local = fit.run([*TINY, "--runs_root", str(root / "local")])
    finally:
        torch.set_num_threads(threads)
    run_dir = root / "runs" / "default" / "version_0"
    lines: list[str] = []
    out: dict = {"local": local, "run_dir": run_dir, "lines": lines}
    run_config = {
        "config": "",
        "overrides": " ".join([*TINY, "--runs_root", str(root / "runs")]),
        "wait-for-nodes": 60,
    }
    federation = Federation(root / "federation", heartbeat_s=QUICK_HEARTBEAT_S)
    federation.env["PNEUMONIA_CACHE"] = str(root / "cache")
    with federation:
        federation.start_superlink()
        federation.start_partition_nodes(2)
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(federation.submit(run_config, lines.append, 900))
        )
        thread.start()
        wait_for_rounds(run_dir, 1, thread)
        out["rows_before_kill"] = read_rounds(run_dir)
        federation.stop_process("supernode-1", signal.SIGKILL)  # dies in round 2
        wait_for_rounds(run_dir, 2, thread)
        federation.stop_process("supernode-0", signal.SIGTERM)  # shut down in round 3
        thread.join(ROUND_TIMEOUT_S)
        out["failed"] = dict(result)
        out["rows_after_failure"] = read_rounds(run_dir)
        federation.start_partition_nodes(2)
        out["resumed"] = federation.submit({"resume": str(run_dir)}, lines.append, 600)
        out["pids"] = [p.pid for p in federation.processes.values()]
    out["rows"] = read_rounds(run_dir)
    return out


def test_run_directory_is_that_of_a_simulated_run(scenario):
    run_dir = scenario["run_dir"]
    for name in ["config.yaml", "rounds.csv", "partition.csv", "split.csv", "summary.json",
                 "predictions.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                 "checkpoints/federated_state.pt"]:  # fmt: skip
        assert (run_dir / name).stat().st_size > 0, name
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert "federated:" in (run_dir / "config.yaml").read_text()
    assert any(line.startswith("round 1/3") for line in scenario["lines"])


def test_rounds_equal_the_in_process_loop(scenario):
    """Same seed and partitions: round 1 (all clients present) is bit-identical to the
    simulated run's: each node trains with the seed of its (round, client), the updates come
    back as exact float32 arrays, and the server averages them in client order."""
    local = read_rounds(Path(scenario["local"]["run_dir"]))
    flower = scenario["rows_before_kill"]
    assert len(flower) == 1
    for ours, theirs in zip(flower, local[:1], strict=True):
        assert {k: ours[k] for k in GLOBAL} == {k: theirs[k] for k in GLOBAL}
        assert ours["clients"] == "0;1" and ours["excluded"] == ""


def test_dead_node_round_completes_with_the_others(scenario):
    second = scenario["rows"][1]
    assert second["clients"] == "0;1" and second["excluded"] == "1"
    assert second["client0_n"] and not second["client1_n"]
    assert any("client 1 left out" in line for line in scenario["lines"])


def test_too_few_live_nodes_fail_the_round_clearly(scenario):
    failed = scenario["failed"]
    assert failed["ok"] is False
    assert failed["error"].startswith("round 3 failed: 0 valid update(s), federated.min_clients")
    assert "--run-config \"resume='" in failed["error"]  # how a deployment resumes
    assert len(scenario["rows_after_failure"]) == 2  # rounds 1-2 kept


def test_resume_continues_from_the_last_completed_round(scenario):
    assert scenario["resumed"]["ok"] is True, scenario["resumed"]
    rows = scenario["rows"]
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert rows[2]["clients"] == "0;1" and rows[2]["excluded"] == ""
    state = torch.load(scenario["run_dir"] / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["round"] == 3


def test_every_process_is_stopped(scenario):
    for pid in scenario["pids"]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
