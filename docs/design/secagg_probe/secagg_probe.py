"""SecAgg+ driven from a custom Message-API main loop (no DefaultWorkflow, no legacy round loop).

Client: @client.train() handler wrapped by a conditional bridge around secaggplus_mod.
Server: per round, LegacyContext + a collecting legacy Strategy + SecAggPlusWorkflow, over a
Grid wrapper (fast polling, drops stage-2 replies whose clear-text count != declared).
"""
from __future__ import annotations

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.client.mod import secaggplus_mod
from flwr.common import FitIns, Parameters, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

SHAPES = [(3, 4), (5,)]
COUNTS = {0: 10, 1: 30, 2: 60}


def values(part: int, rnd: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 * rnd + part)
    return [rng.uniform(-0.5, 0.5, s).astype(np.float32) for s in SHAPES]


# ----------------------------------------------------------------------------- client
def bridge(msg: Message, ctxt: Context, call_next):
    """Only SecAgg+ traffic goes through secaggplus_mod (plain train messages would KeyError)."""
    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


client = ClientApp(mods=[bridge])


@client.query()
def query(msg: Message, context: Context) -> Message:
    part = int(context.node_config["partition-id"])
    return Message(RecordDict({"node": ConfigRecord({"part": part})}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    part = int(context.node_config["partition-id"])
    cfg = msg.content.config_records["fitins.config"]  # the FitIns the adapter built
    rnd = int(cfg["round"])
    if part in json.loads(str(cfg["fail"])):
        raise RuntimeError(f"partition {part} fails in round {rnd}")
    n = COUNTS[part] + (1000 if part in json.loads(str(cfg["lie"])) else 0)
    arrays = values(part, rnd)
    return Message(
        RecordDict(
            {
                "fitres.parameters": ArrayRecord({str(i): Array(a) for i, a in enumerate(arrays)}),
                "fitres.num_examples": MetricRecord({"num_examples": n}),
                "fitres.metrics": ConfigRecord({"train-loss": 0.5}),  # clear text!
                "fitres.status": ConfigRecord({"code": 0, "message": ""}),
            }
        ),
        reply_to=msg,
    )


# ----------------------------------------------------------------------------- server
class Collect(LegacyStrategy):
    """The workflow's hooks: hand out our FitIns, keep what it aggregates."""

    def __init__(self, fitins: dict[int, FitIns], grid: Grid, run_id: int) -> None:
        self.fitins, self.grid, self.run_id = fitins, grid, run_id
        self.results = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(n, self.grid, self.run_id), f) for n, f in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):
        self.results = (results, failures)
        return None, {}  # nothing written into context.state

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class FastGrid:
    """What the workflow calls on the Grid: send_and_receive. Polls every 0.2 s (Flower's: 3 s)
    and drops a stage-2 reply whose clear-text count differs from the declared one (the
    workflow then treats that node as dropped and removes its masks)."""

    def __init__(self, grid: Grid, declared: dict[int, int], log: list) -> None:
        self.grid, self.declared, self.log = grid, declared, log

    def send_and_receive(self, messages, *, timeout=None):
        t0 = time.time()
        ids = {i for i in self.grid.push_messages(list(messages)) if i}
        out = []
        end = None if timeout is None else time.time() + timeout
        while ids and (end is None or time.time() < end):
            for r in self.grid.pull_messages(list(ids)):
                ids.discard(r.metadata.reply_to_message_id)
                out.append(r)
            if ids:
                time.sleep(0.2)
        kept = []
        for r in out:
            if r.has_error():
                self.log.append(f"error reply: {r.error.reason[-300:]}")
                kept.append(r)
                continue
            c = r.content
            if not r.has_error() and "fitres.num_examples" in c.metric_records:
                n = int(c.metric_records["fitres.num_examples"]["num_examples"])
                if n != self.declared[r.metadata.src_node_id]:
                    self.log.append(f"dropped node {r.metadata.src_node_id}: count {n}")
                    continue
                masked = c.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                self.log.append(f"stage2 reply: {len(masked)} masked arrays, "
                                f"{sum(len(b) for b in masked)} bytes")
            kept.append(r)
        self.log.append(f"stage exchange {time.time() - t0:.2f}s, {len(kept)}/{len(out)} kept")
        return kept


server = ServerApp()


def secure_round(grid, context, nodes, part_of, rnd, fail, lie, log):
    fitins = {
        n: FitIns(Parameters([], ""), {"round": rnd, "fail": json.dumps(fail),
                                       "lie": json.dumps(lie)})
        for n in nodes
    }
    strategy = Collect(fitins, grid, context.run_id)
    legacy = LegacyContext(context, strategy=strategy)
    legacy.state.config_records["config"] = ConfigRecord({"current_round": rnd})
    legacy.state.array_records["parameters"] = ArrayRecord()
    workflow = SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2, timeout=60,
                                  max_weight=1000.0, clipping_range=8.0)
    declared = {n: COUNTS[part_of[n]] for n in nodes}
    t0 = time.time()
    workflow(FastGrid(grid, declared, log), legacy)
    wall = time.time() - t0
    if strategy.results is None:
        return {"round": rnd, "ok": False, "wall_s": wall, "why": "workflow halted"}
    results, failures = strategy.results
    agg = [np.asarray(a) for a in
           __import__("flwr.common", fromlist=["x"]).parameters_to_ndarrays(results[0][1].parameters)]
    parts = sorted(part_of[p.node_id] for p, _ in results)
    ns = {part_of[p.node_id]: r.num_examples for p, r in results}
    total = sum(ns.values())
    exp_avg = [sum(ns[j] * values(j, rnd)[i].astype(np.float64) for j in parts) / total
               for i in range(len(SHAPES))]
    exp_sum = [sum(values(j, rnd)[i].astype(np.float64) for j in parts) for i in range(len(SHAPES))]
    # the weighted sum sum_j n_j x_j is agg * total; the plain sum needs equal weights, so report
    # the weighted-average error, and the error of n-weighted sum relative to its plain value
    err_avg = max(float(np.abs(a - e).max()) for a, e in zip(agg, exp_avg))
    return {"round": rnd, "ok": True, "wall_s": round(wall, 2), "parts": parts,
            "counts": ns, "failures": len(failures), "dtype": str(agg[0].dtype),
            "shapes": [list(a.shape) for a in agg], "max_abs_err_weighted_avg": err_avg,
            "bound": len(parts) * (2 * 8.0 / 2**22) / (total / 1000.0),
            "plain_sum_first": [round(float(v), 6) for v in exp_sum[1][:3]]}


@server.main()
def main(grid: Grid, context: Context) -> None:
    status_file = str(context.run_config.get("status-file", ""))
    out: dict = {"rounds": [], "log": []}
    try:
        deadline = time.time() + 60
        while len(nodes := sorted(grid.get_node_ids())) < 3 and time.time() < deadline:
            time.sleep(0.5)
        replies = grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes], timeout=60)
        part_of = {r.metadata.src_node_id: int(r.content["node"]["part"]) for r in replies}
        by_part = {p: n for n, p in part_of.items()}
        plan = [([], []), ([2], []), ([], [1]), ([1, 2], [])]  # (fail, lie) by partition
        for rnd, (fail, lie) in enumerate(plan, 1):
            out["rounds"].append(secure_round(grid, context, nodes, part_of, rnd, fail, lie,
                                              out["log"]))
        out["ok"] = True
    except BaseException as err:  # noqa: BLE001
        import traceback
        out |= {"ok": False, "error": traceback.format_exc()}
    if status_file:
        open(status_file, "w").write(json.dumps(out, indent=1))
