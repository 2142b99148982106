"""A SuperLink and SuperNodes as local processes over TLS, for the demo, the tests and the
benchmark: every process it starts is stopped when the `Federation` closes, also on Ctrl-C or
an error. Real hospitals start the same commands by hand (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import tomli_w

from pneumonia.core.errors import UserError
from pneumonia.core.interrupt import check, deferred
from pneumonia.flower import tls

APP_DIR = Path(__file__).parent / "app"  # the Flower App `flwr run` submits
CONNECTION = "local-tls"
FLOWER_LOG = re.compile(r"^(\x1b\[\d+m)?(INFO|DEBUG)\s*(\x1b\[0m)?\s*:")


def usable_cores() -> int:
    """The cores this process may run on (its affinity, where the system says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_node(nodes: int) -> int:
    """This machine's cores shared among `nodes` SuperNodes."""
    return max(1, (os.cpu_count() or 1) // nodes)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def executable(name: str) -> str:
    """A Flower command from this Python's environment (or PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise UserError(
            f"{name} not found: install the Flower extra, pip install 'pneumonia[flower]'"
        )
    return found


def node_config_text(node_config: dict) -> str:
    """--node-config's "key=value ..." form, strings quoted as TOML wants them."""
    return " ".join(
        f"{k}={v}" if isinstance(v, int | float) else f'{k}="{v}"' for k, v in node_config.items()
    )


class Federation:
    """SuperLink + SuperNodes on `host`, logs and certificates under `workdir`."""

    def __init__(
        self, workdir: Path, host: str = "127.0.0.1", heartbeat_s: float | None = None
    ) -> None:
        """`heartbeat_s`: the SuperNodes' heartbeat (None: Flower's 30 s; the SuperLink
        notices a dead node after two missed), shorter for tests (quick_supernode)."""
        self.workdir, self.host, self.heartbeat_s = Path(workdir).resolve(), host, heartbeat_s
        self.logs = self.workdir / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.certs: tls.Certificates | None = None
        self.port = 0
        # Flower's processes start more of Flower's commands by name (flower-superexec,
        # flwr-clientapp): they must find this environment's, venv activated or not.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = os.environ | {
            "FLWR_HOME": str(self.workdir / "flwr-home"),  # not the user's ~/.flwr
            "PATH": path,
            "PYTHONUNBUFFERED": "1",
        }

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        # Its own session: stopping it stops its children too (flwr-serverapp, flwr-clientapp).
        with deferred():  # registered before a Ctrl-C can stop us (see submit)
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env | (env or {}),
                start_new_session=True,
            )
            # Popen has no field for its log file: kept on it so it closes with the process
            process.log = log  # type: ignore[attr-defined]
            self.processes[name] = process
        check()
        return process

    def stop_process(self, name: str, sig: int = signal.SIGTERM, grace_s: float = 10) -> None:
        process = self.processes.pop(name)
        try:
            os.killpg(process.pid, sig)
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass
        if hasattr(process, "log"):
            process.log.close()

    def close(self) -> None:
        """Stop every process this federation started: nodes first, then the SuperLink."""
        for name in sorted(self.processes, key=lambda n: n == "superlink"):
            self.stop_process(name)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- SuperLink and SuperNodes ----------------------------------------------------------

    def start_superlink(self, certs: tls.Certificates | None = None, wait_s: float = 60) -> None:
        """The SuperLink with TLS, and the `flwr` CLI's connection to it."""
        self.certs = certs or tls.generate(self.workdir / "certs", [self.host, "localhost"])
        self.port = free_port(self.host)
        self._spawn(
            "superlink",
            [
                executable("flower-superlink"),
                *("--host", self.host, "--port", str(self.port)),
                *("--ssl-ca-certfile", str(self.certs.ca)),
                *("--ssl-certfile", str(self.certs.server_cert)),
                *("--ssl-keyfile", str(self.certs.server_key)),
            ],
        )
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        connection = {"address": self.address, "root-certificates": str(self.certs.ca)}
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (home / "config.toml").write_text(tomli_w.dumps(config))
        self._wait_for_port("superlink", self.port, wait_s)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ca(self) -> Path:
        """The CA certificate every node trusts by default (start_superlink made it)."""
        if self.certs is None:
            raise RuntimeError("start_superlink() first: this federation has no certificates")
        return self.certs.ca

    def _wait_for_port(self, name: str, port: int, wait_s: float) -> None:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.processes[name].poll() is not None:
                raise UserError(f"{name} exited at start: see {self.logs / name}.log")
            with socket.socket() as s:
                if s.connect_ex((self.host, port)) == 0:
                    return
            time.sleep(0.2)
        raise UserError(f"{name} did not listen on port {port} within {wait_s:.0f} s")

    def start_supernode(
        self,
        name: str,
        node_config: dict,
        root_certificates: Path | None = None,
        *extra: str,
        threads: int | None = None,
    ) -> subprocess.Popen:
        """A SuperNode that trusts `root_certificates` (default: this federation's CA). Nodes
        sharing one machine should split its cores (`threads`): several torch processes each
        spinning on every core run many times slower than one."""
        # The node's own client curves stay with its logs, not in the working directory.
        node_config = {"log-dir": str(self.logs / f"{name}-tensorboard")} | node_config
        ca = root_certificates or self.ca
        trust = [] if "--insecure" in extra else ["--root-certificates", str(ca)]
        env = {"OMP_NUM_THREADS": str(threads)} if threads else None
        command = [executable("flower-supernode")]
        if self.heartbeat_s is not None:
            module = "pneumonia.flower.quick_supernode"
            command = [sys.executable, "-m", module, "--heartbeat-s", str(self.heartbeat_s)]
        return self._spawn(
            name,
            [
                *command,
                *("--superlink", self.address, *trust),
                *("--host", self.host, "--port", str(free_port(self.host))),
                *("--node-config", node_config_text(node_config)),
                *extra,
            ],
            env,
        )

    def start_partition_nodes(self, nodes: int, which: Iterable[int] | None = None) -> None:
        """Demo SuperNodes `supernode-J`, each holding partition J of the run's data (all
        `nodes` of them, or those in `which`), sharing this machine's cores."""
        for j in range(nodes) if which is None else which:
            self.start_supernode(
                f"supernode-{j}",
                {"partition-id": j, "num-partitions": nodes},
                threads=threads_per_node(nodes),
            )

    def _relay(self, run: subprocess.Popen[str], echo: Callable[[str], None]) -> None:
        assert run.stdout is not None  # submit started it with stdout=PIPE
        with open(self.logs / "flwr-run.log", "a") as log:
            for line in run.stdout:
                log.write(line)
                log.flush()
                if not FLOWER_LOG.match(line):
                    echo(line.rstrip("\n"))

    # -- runs ------------------------------------------------------------------------------

    def submit(
        self, run_config: dict, echo: Callable[[str], None] = print, timeout_s: float = 3600
    ) -> dict:
        """`flwr run` the app with `run_config` and wait for it; its status (ok, run_dir or
        error). Flower's own INFO lines go to logs/flwr-run.log only; the rest to `echo`."""
        status_file = self.workdir / f"status-{time.time_ns()}.json"
        overrides = self.workdir / "run-config.toml"
        overrides.write_text(tomli_w.dumps(run_config | {"status-file": str(status_file)}))
        argv = [executable("flwr"), "run", str(APP_DIR), CONNECTION, "--stream"]
        argv += ["--run-config", str(overrides)]
        self.logs.mkdir(parents=True, exist_ok=True)
        # A Ctrl-C while `flwr run` is being spawned must find it registered, or close()
        # would leave it running: the signal waits until it is (interrupt.deferred).
        with deferred():
            run = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
                start_new_session=True,
            )
            self.processes["flwr-run"] = run
        check()
        reader = threading.Thread(target=self._relay, args=(run, echo), daemon=True)
        reader.start()
        deadline = time.time() + timeout_s
        while run.poll() is None and time.time() < deadline and not status_file.exists():
            time.sleep(0.2)
        if status_file.exists():  # let it print the ServerApp's last lines and end itself
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(10)
        self.stop_process("flwr-run", grace_s=5)
        reader.join(5)
        if not status_file.exists() and time.time() >= deadline:
            raise UserError(
                f"the Flower run did not finish within {timeout_s:.0f} s: see {self.logs}"
            )
        if not status_file.exists():
            raise UserError(f"the Flower run ended without a result: see {self.logs}")
        return json.loads(status_file.read_text())
