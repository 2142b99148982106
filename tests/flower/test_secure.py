"""Secure aggregation (Flower's SecAgg+) on a real loopback federation: a SuperLink and three
SuperNodes as processes, over TLS.

One scenario (module fixture) of one round, since a secure round costs four message round
trips of Flower process start-ups (about 35 s here): SuperNode 2 is stopped while it trains
(the protocol's third stage), after it has shared its keys, and the round completes with
clients 0 and 1. The ServerApp is the package's, its Grid wrapped by
tests/flower/recording_app/recorder.py to keep every reply the server's code receives. An
in-process run of the same round (the same seed and partitions, plain FedAvg) gives each
client's true update, and FedAvg of clients 0 and 1 the plain global model.
"""

from __future__ import annotations

import pickle
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_federation import QUICK_HEARTBEAT_S, read_rounds
from test_federation import TINY as TWO_NODES

from pneumonia import fit
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.server import Server
from pneumonia.federated.strategies import FedAvg
from pneumonia.flower import launch, secure, wire
from pneumonia.flower.launch import Federation, threads_per_node

RECORDING_APP = Path(__file__).parent / "recording_app"
TINY = [*TWO_NODES, "--federated.clients", "3", "--federated.rounds", "1"]
SECURE = [*TINY, "--federated.secure_aggregation", "true"]
QUANTUM = 2 * secure.DEFAULT_CLIPPING_RANGE / 2**22  # Flower's quantization_range: 2^22 levels


def tolerance(counts: list[int], max_weight: int) -> float:
    """SecAgg+'s error per coordinate of the average: each of k clients rounds its weighted
    delta (weight n_j / max_weight, max_weight the largest count declared by the round's
    clients) stochastically to one quantum, 2C / Q; the sum of k such errors, divided by the
    total weight sum(n) / max_weight."""
    return len(counts) * QUANTUM * max_weight / sum(counts)


def wait_for(condition, what: str, timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while not condition():
        assert time.time() < deadline, f"{what} did not happen in {timeout_s} s"
        time.sleep(0.1)


def reference(root: Path) -> dict:
    """The round in this process, plain FedAvg: the global model before it and every client's
    update (the Server's input), with the nodes' thread count (oneDNN's float sums depend on
    it); and FedAvg of the members of the secure round, clients 0 and 1."""
    seen: dict = {}
    aggregate = Server.aggregate

    def recording(self, round_index, updates, failures):
        seen.update(start=dict(self.global_state), updates=list(updates))
        return aggregate(self, round_index, updates, failures)

    threads = torch.get_num_threads()
    torch.set_num_threads(threads_per_node(3))
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Server, "aggregate", recording)
            fit.run([*TINY, "--runs_root", str(root)])
    finally:
        torch.set_num_threads(threads)
    members = [u for u in seen["updates"] if u.client != 2]
    return seen | {"plain": FedAvg().aggregate(seen["start"], members)}


def stop_while_training(federation: Federation, thread: threading.Thread) -> None:
    """Stop SuperNode 2 once its third train message arrives: the protocol's third stage,
    keys shared, masked vector not yet sent."""
    log = federation.logs / "supernode-2.log"
    wait_for(
        lambda: not thread.is_alive() or log.read_text().count("Receiving: train message") >= 3,
        "the training stage on node 2",
    )
    federation.stop_process("supernode-2", signal.SIGTERM)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    out: dict = {"reference": reference(root / "local"), "lines": []}
    run_dir = root / "runs" / "default" / "version_0"
    record = root / "replies.pkl"
    run_config = {
        "config": "",
        "overrides": " ".join([*SECURE, "--runs_root", str(root / "runs")]),
        "wait-for-nodes": 60,
        "record-file": str(record),
    }
    with (
        pytest.MonkeyPatch.context() as patch,
        Federation(root / "federation", heartbeat_s=QUICK_HEARTBEAT_S) as federation,
    ):
        patch.setattr(launch, "APP_DIR", RECORDING_APP)
        federation.env["PNEUMONIA_CACHE"] = str(root / "cache")
        federation.start_superlink()
        federation.start_partition_nodes(3)
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(federation.submit(run_config, out["lines"].append, 600))
        )
        thread.start()
        stop_while_training(federation, thread)
        thread.join(300)
        out["status"] = result
        wait_for(record.is_file, "the recorded replies", 30)
    out["rows"] = read_rounds(run_dir)
    out["round1"] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    out["replies"] = pickle.loads(record.read_bytes())
    return out


def test_secure_global_model_equals_plain_within_the_quantization_error(scenario):
    ref = scenario["reference"]
    assert scenario["round1"]["round"] == 1
    ours, theirs = scenario["round1"]["state_dict"], ref["plain"]
    keys = wire.float_keys(theirs)
    counts = {u.client: u.n for u in ref["updates"]}
    bound = tolerance([counts[0], counts[1]], max(counts.values()))
    # float32: the global model is cast back after the average, in either run.
    slack = max(float(np.spacing(np.float32(abs(v).max()))) for v in theirs.values())
    error = float(np.abs(float_vector(ours, keys) - float_vector(theirs, keys)).max())
    assert error <= bound + slack, (error, bound, slack)
    assert error > 0  # stochastic rounding: not the plain average to the bit
    print(f"secure vs plain: max |error| {error:.3g}, bound {bound:.3g} + float32 {slack:.3g}")
    for key, tensor in theirs.items():  # integer buffers stay the global's
        if not tensor.is_floating_point():
            assert torch.equal(ours[key], ref["start"][key]), key


def test_a_node_dropping_out_mid_protocol_leaves_the_round_to_the_others(scenario):
    assert scenario["status"]["ok"] is True, scenario["status"]
    (row,) = scenario["rows"]
    assert row["clients"] == "0;1;2" and row["excluded"] == "2"
    counts = {u.client: u.n for u in scenario["reference"]["updates"]}
    assert {j: int(row[f"client{j}_n"]) for j in (0, 1)} == {0: counts[0], 1: counts[1]}
    assert not row["client2_n"]  # clear-text metadata, of the members only
    assert any("client 2 left out" in line for line in scenario["lines"])


def float_vector(state: dict, keys: list[str]) -> np.ndarray:
    return torch.cat([state[k].double().reshape(-1) for k in keys]).numpy()


def correlated(received: np.ndarray, truth: np.ndarray) -> bool:
    """`received` is `truth` or an affine image of it (quantized, scaled, shifted), compared on
    the received array's last len(truth) values (SecAgg+ prepends the weight)."""
    tail = received.astype(np.float64).reshape(-1)[-truth.size :]
    if tail.size != truth.size or tail.std() == 0:
        return False
    return abs(float(np.corrcoef(tail, truth)[0, 1])) > 0.1


def truths(client_state: dict, start: dict) -> dict[str, np.ndarray]:
    """A client's state and update, as whole float vectors and tensor by tensor."""
    keys = wire.float_keys(start)
    out = {"state": float_vector(client_state, keys)}
    out["update"] = out["state"] - float_vector(start, keys)
    for key in keys:
        out[f"state of {key}"] = client_state[key].double().reshape(-1).numpy()
        out[f"update of {key}"] = (client_state[key] - start[key]).double().reshape(-1).numpy()
    return out


def leaks(arrays: list[np.ndarray], client_state: dict, start: dict) -> list[str]:
    """Where `arrays` holds a client's state or update: the whole float vector (or an affine
    image of it), or any one tensor of either, equal within 1e-4."""
    found, known = [], truths(client_state, start)
    for i, array in enumerate(arrays):
        flat = np.asarray(array, dtype=np.float64).reshape(-1)
        for name, truth in known.items():
            whole = name in ("state", "update")
            if whole and abs(flat.size - truth.size) <= 1 and correlated(flat, truth):
                found.append(f"array {i} correlates with the client's {name}")
            elif truth.size == flat.size > 1 and np.allclose(flat, truth, atol=1e-4):
                found.append(f"array {i} is the client's {name}")
    return found


def test_the_server_receives_no_single_clients_update(scenario):
    """Every reply the ServerApp's Grid returned, in every stage: no array is a client's
    state or update (the whole vector or one tensor), nor correlates with it; the masked
    vectors themselves (one per member) were among what was checked."""
    ref, arrays = scenario["reference"], scenario["replies"]
    size = sum(v.numel() for v in ref["start"].values() if v.is_floating_point())
    assert len([a for a in arrays if a.size == size]) == 2
    for update in ref["updates"]:
        assert leaks(arrays, update.state, ref["start"]) == [], update.client


def test_the_privacy_check_finds_a_plain_update():
    """The check above flags what a plain train reply carries."""
    state = {"w": torch.randn(40, 3), "b": torch.randn(7), "steps": torch.tensor(3)}
    start = {k: v - 0.01 * torch.randn_like(v.double()).to(v.dtype) for k, v in state.items()}
    start["steps"] = torch.tensor(2)
    content = wire.train_reply(ClientUpdate(0, state, 10, 0.5, 0.5))
    arrays = [a.numpy() for record in content.array_records.values() for a in record.values()]
    assert leaks(arrays, state, start)
    delta = wire.flat_delta(state, start)
    assert leaks([np.concatenate([[0.25], 3 * delta + 1])], state, start)  # an affine image
