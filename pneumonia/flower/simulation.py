"""federated.engine simulation: `fit`'s federated job with its clients on Flower's simulation
runtime, where the clients of a round train side by side in Ray workers.

The job is the run layer's (`run_job`), in this process's main thread as with the in-process
loop, so its signals, errors, progress hook, run directory, summary and resume are the same.
Its clients are a `SimulatedCohort`: a `FlowerCohort` over the simulation's in-memory Grid
whose SuperNodes are virtual (node_config partition-id=J: each loads the data and keeps part J
as the in-process loop splits it) and run the package's ClientApp handlers in a pool of Ray
actors, as many at once as fit `federated.client_cpus` and `client_gpus` into the machine.
Unlike a deployment's nodes, they keep nothing between rounds: the server holds each client's
own state (FedBN's norms, a kept optimizer, its step count, its DP accountant), sends it with
the client's round and saves it in the round state, as the in-process loop does.

Flower's runtime (`flwr.simulation.run_simulation`) runs in a background thread; its ServerApp
only hands this thread the Grid and waits for the job to end. Ray is started here, in the main
thread, so that the run keeps its own SIGINT/SIGTERM handling (Ray's would exit at once); when
the job ends, however it ends, the runtime is stopped and Ray shut down with its workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from queue import Empty, Queue
from typing import cast

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from jsonargparse import Namespace

from pneumonia.core.errors import UserError, first_line
from pneumonia.core.interrupt import deferred, handlers_kept
from pneumonia.federated.aggregate import ClientUpdate
from pneumonia.federated.cohort import RoundTask, misbehave
from pneumonia.flower import client_app, node, wire
from pneumonia.flower.cohort import FlowerCohort
from pneumonia.flower.launch import usable_cores
from pneumonia.run.job import run_job
from pneumonia.run.progress import Progress
from pneumonia.training.recipe import Recipe

log = logging.getLogger(__name__)

START_S = 600.0  # for Ray, its workers and the virtual SuperNodes' first answers
NO_TIMEOUT_S = 10.0 * 365 * 86400  # a simulated client has no deadline, as in this process
STOP_S = 60.0  # for the runtime to wind down once the job has ended


def local_faults(msg: Message, context: Context, call_next) -> Message:
    """A client that raises leaves its round with the in-process loop's line ("raised
    ValueError: ..."), instead of Ray's traceback."""
    try:
        return call_next(msg, context)
    except Exception as err:  # one hospital's failure must not end the federation
        reason = f"raised {type(err).__name__}: {first_line(err)}"
        error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
        return Message(error=error, reply_to=msg)


# The package's ClientApp handlers, as every virtual SuperNode runs them.
app = ClientApp(mods=[local_faults, client_app.secure_aggregation])
app.query()(client_app.query)
app.train()(client_app.train)


class SimulatedCohort(FlowerCohort):
    """The simulation's virtual SuperNodes as the round loop's clients. What differs from a
    deployment is what the in-process loop (`LocalCohort`) does: each client's state is kept
    here (`state_dict` for the round state), clients log into the run directory, a client
    that raises is left out with the same line, and federated.hostile is simulated."""

    def __init__(self, grid: Grid, config_yaml: str, cfg: Namespace) -> None:
        super().__init__(grid, config_yaml, cfg.federated.clients, START_S, NO_TIMEOUT_S)
        self.hostile = cfg.federated.hostile
        self.states: list[dict | None] = [None] * len(self)  # None: not trained yet
        self.log_dir: Path | None = None

    def start(self, recipe: Recipe, log_dir: Path) -> None:
        super().start(recipe, log_dir)
        self.log_dir = Path(log_dir).resolve()  # the workers' working folder may differ

    def request(self, client: int, task: RoundTask) -> wire.TrainRequest:
        state = self.states[client]
        kept = node.pack_state(state) if state is not None else b""
        return wire.TrainRequest(
            task,
            client,
            self.config_yaml,
            cast(Recipe, self.recipe),
            self.record_timings,
            client_state=kept,
            log_dir=str(self.log_dir),
        )

    def read_reply(self, content: RecordDict, client: int) -> tuple[ClientUpdate, dict]:
        state = wire.read_client_state(content)
        if state is None:
            raise ValueError(f"client {client}'s reply holds no client state")
        self.states[client] = node.unpack_state(state)
        return super().read_reply(content, client)

    def failure(self, reply: Message) -> str:
        return first_line(str(reply.error.reason), 300)

    def train_round(
        self, chosen: Sequence[int], task: RoundTask
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        updates, failures = super().train_round(chosen, task)
        return [misbehave(u, task.global_state, self.hostile) for u in updates], failures

    def state_dict(self) -> list:
        return list(self.states)

    def load_state_dict(self, states: list) -> None:
        if len(states) != len(self):
            raise UserError(
                f"the round state holds {len(states)} clients and the run has {len(self)}: "
                f"resume with the run's own config"
            )
        for j, state in enumerate(states):
            self.check_log_folder(j, state)
        self.states = list(states)

    def check_log_folder(self, client: int, state: dict | None) -> None:
        """As `LocalCohort.check_log_folder`: a resumed client that has trained finds its
        folder (its TensorBoard curves) as it left it."""
        assert self.log_dir is not None  # the round loop calls start() before restoring
        folder = self.log_dir / f"client_{client}"
        if state is None or int(state["steps"]) == 0 or folder.is_dir():
            return
        problem = "is missing" if not folder.exists() else "is not a folder"
        raise UserError(
            f"{folder}, the folder of client {client}, {problem}: put that client's folder "
            f"back (or replace it with an empty folder to continue without its earlier "
            f"curves), then run the command again"
        )


class WatchedGrid:
    """The simulation's Grid, refusing to wait on a runtime that has stopped: a round would
    otherwise wait forever for replies that cannot come."""

    def __init__(self, grid: Grid, runtime: Runtime) -> None:
        self.grid, self.runtime = grid, runtime

    def get_node_ids(self):
        self.runtime.check()
        return self.grid.get_node_ids()

    def push_messages(self, messages):
        self.runtime.check()
        self.runtime.workers |= worker_pids()  # those that will run these messages
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids):
        self.runtime.check()
        return self.grid.pull_messages(message_ids)


class Runtime:
    """Flower's simulation runtime for one job, started when the job asks for its clients
    (after its checks and its data) and stopped when the job ends."""

    def __init__(self) -> None:
        self.grids: Queue[Grid] = Queue()
        self.finished = threading.Event()  # the job has ended: the ServerApp returns
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.workers: set[int] = set()  # the pids of Ray's workers, noted at every send
        self.ray_started = False

    def connect(self, cfg: Namespace, config_yaml: str) -> SimulatedCohort:
        """The job's cohort factory: Ray, the runtime, and the cohort of its SuperNodes."""
        import ray

        if ray.is_initialized():  # Flower's runtime shuts Ray down when it ends
            raise UserError(
                "Ray is already running in this process, and federated.engine simulation "
                "starts and stops its own: call ray.shutdown() first"
            )
        self.ray_started = True  # stop() shuts it down, even if its start is cut short
        start_ray(cfg)
        self.thread = threading.Thread(
            target=self.run, args=(cfg,), name="flower-simulation", daemon=True
        )
        self.thread.start()
        grid = cast(Grid, WatchedGrid(self.wait_for_grid(), self))
        return SimulatedCohort(grid, config_yaml, cfg)

    def run(self, cfg: Namespace) -> None:
        """The runtime's thread: Flower's run_simulation with a ServerApp that gives the job
        its Grid and returns when the job has ended."""
        from flwr.simulation import run_simulation

        server = ServerApp()

        @server.main()
        def hand_over(grid: Grid, context: Context) -> None:
            self.grids.put(grid)
            self.finished.wait()

        fed = cfg.federated
        resources = {"num_cpus": fed.client_cpus, "num_gpus": fed.client_gpus}
        try:
            run_simulation(
                server_app=server,
                client_app=app,
                num_supernodes=fed.clients,
                backend_name="ray",
                backend_config={"client_resources": resources},
            )
        except BaseException as err:  # reported by check(), in the job's thread
            self.error = err

    def wait_for_grid(self) -> Grid:
        while True:
            try:
                return self.grids.get(timeout=0.5)
            except Empty:
                self.check()

    def check(self) -> None:
        """Raise UserError if the runtime stopped before the job ended."""
        assert self.thread is not None
        if self.thread.is_alive() or self.finished.is_set():
            return
        err = self.error
        why = first_line(err.__cause__ or err, 300) if err is not None else "it ended"
        raise UserError(f"Flower's simulation runtime stopped during the run: {why}")

    def stop(self, abandon: bool) -> None:
        """End the runtime: the ServerApp returns and Flower stops its workers and Ray.
        `abandon`: the job did not end normally, and a round may still be training: its
        workers are ended at once, as the in-process loop abandons its round on a signal."""
        import ray

        if not self.ray_started:
            return
        if abandon:
            end_workers(self.workers)
        self.finished.set()
        if self.thread is not None:
            self.thread.join(STOP_S)
        ray.shutdown()  # Flower's own shutdown, if the runtime ended in time, leaves nothing


def worker_pids() -> set[int]:
    """The processes of Ray's live actors, the workers that run the ClientApp."""
    from ray._private import state

    return {a["Pid"] for a in state.actors().values() if a["State"] == "ALIVE" and a["Pid"]}


def end_workers(pids: set[int]) -> None:
    """Kill the workers by their process ids, as noted while Ray could still name them (a
    signal to the whole process group ends Ray's own services too); each must still be one
    of Ray's workers, not a process that took over its id."""
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                os.kill(pid, signal.SIGKILL)


def start_ray(cfg: Namespace) -> None:
    """Ray in this process for the runtime, with the run's signal handling kept, after the
    resources per client are checked against the machine's."""
    import ray

    fed = cfg.federated
    cores = usable_cores()
    with handlers_kept(), warnings.catch_warnings():
        # Ray's notice about a future default for GPU visibility: the workers get what their
        # client_gpus give them either way.
        warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
        ray.init(
            # No more workers than clients: each is a process holding torch and a model.
            num_cpus=min(cores, fed.clients * fed.client_cpus),
            include_dashboard=False,
            logging_level=logging.ERROR,
            # The clients' Lightning lines, per round: the in-process loop prints none either.
            log_to_driver=False,
            runtime_env={
                "env_vars": {
                    # A worker's torch threads: its share of the cores, not all of them.
                    "OMP_NUM_THREADS": str(fed.client_cpus),
                    # Where this process found the package (`python bench/x.py` from a clone).
                    "PYTHONPATH": os.pathsep.join(sys.path),
                }
            },
        )
    gpus = ray.cluster_resources().get("GPU", 0)
    if fed.client_gpus > gpus:  # Runtime.stop shuts Ray down
        raise UserError(
            f"federated.client_gpus {fed.client_gpus:g} is more than the {gpus:g} GPUs Ray "
            f"finds here: lower it (0: the clients train on CPU)"
        )
    if gpus and not fed.client_gpus:  # Ray hides the GPUs from a worker that holds none
        log.warning(
            f"the clients train on CPU, federated.client_gpus being 0: give them the "
            f"{gpus:g} GPU(s) here with federated.client_gpus (1, or 0.5 for two to a GPU)"
        )


def run_simulated(
    cfg: Namespace, config_yaml: str, resume: Path | None, progress: Progress | None
) -> dict:
    """`fit`'s job with its clients on Flower's simulation runtime; the summary."""
    runtime = Runtime()
    with quiet_flower():
        try:
            summary = run_job(cfg, config_yaml, resume, progress, cohort=runtime.connect)
        except BaseException:
            with deferred():  # a second Ctrl-C must not cut the shutdown short
                runtime.stop(abandon=True)
            raise
        runtime.stop(abandon=False)
    return summary


@contextlib.contextmanager
def quiet_flower() -> Iterator[None]:
    """Flower's log lines (run_simulation's notice that `flwr run` will replace it, the
    runtime's own) stay out of the run's output, as the in-process loop has none: what goes
    wrong reaches the run as a client's failure or a runtime that stopped (`Runtime.check`)."""
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        flower.setLevel(level)
