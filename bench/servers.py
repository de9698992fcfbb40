"""Server processes under test: start on a free port, wait until ready, measure, always stop.

All three apps run through the same command, `python -m uvicorn <factory> --factory`, so the
stack (loop, HTTP parser, workers) is identical. With the defaults (auto, auto, 1) this is what
`python -m app` runs; the CLI is used instead because `uvicorn.run(app_object)` cannot fork
workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import httpx

REPO = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Stack:
    loop: str
    http: str
    workers: int

    def uvicorn_args(self) -> list[str]:
        return ["--loop", self.loop, "--http", self.http, "--workers", str(self.workers)]


# What `python -m app` runs with its defaults (VAE_LOOP=asyncio, VAE_HTTP=auto, one worker).
SERVICE_STACK = Stack("asyncio", "auto", 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ServerError(RuntimeError):
    pass


class Process:
    """A server process on a port: started in a session of its own with none of the caller's
    VAE_* variables (only `env`'s), polled until `ready_path` answers 200, and stopped with
    everything it started. bench's `Server` and the tests' servers both build on it."""

    def __init__(
        self,
        cmd: list[str],
        *,
        port: int,
        env: dict[str, str],
        log: Path,
        name: str = "server",
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.cwd = cwd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith("VAE_")}
        self._env = {**base, **env}
        self._cmd = cmd
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise ServerError(f"{self.name} is not running")
        return self._proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def launch(self) -> None:
        with self.log.open("wb") as log:
            # A session of its own: stop() can then kill the workers too, and only them.
            self._proc = subprocess.Popen(
                self._cmd,
                cwd=self.cwd,
                env=self._env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 60.0, ready_path: str = "/ready") -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._proc is not None and self._proc.poll() is not None:
                    raise ServerError(f"{self.name} exited early:\n{self.log_tail()}")
                try:
                    if http.get(self.url + ready_path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise ServerError(f"{self.name} not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: uvicorn stops its workers and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        # Whatever is left of our session (a stuck worker): only processes we started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Server(Process):
    """One uvicorn process (a supervisor plus workers when workers > 1), as a context manager."""

    def __init__(
        self,
        name: str,
        factory: str,
        stack: Stack,
        *,
        port: int,
        ready_path: str,
        env: dict[str, str],
        log_dir: Path,
        cmd: list[str] | None = None,
        whole_session: bool = False,
        cwd: Path = REPO,
    ) -> None:
        """`factory` runs under the uvicorn CLI with `stack`; or `cmd` runs as it is (a server
        that starts its own processes: LitServe, `python -m app` with workers), with `stack`
        saying how many serving processes it spawns. `whole_session`: every process the
        server starts serves (LitServe's API and inference processes), so memory and CPU are
        summed over all of them."""
        cmd = cmd or [
            sys.executable,
            "-m",
            "uvicorn",
            factory,
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *stack.uvicorn_args(),
            # Access lines are INFO: off at warning, as VAE_LOG_LEVEL=warning does for the app.
            "--log-level",
            "warning",
            "--no-access-log",
            # Nothing is in flight when we stop; don't wait 30 s as `python -m app` would.
            "--timeout-graceful-shutdown",
            "5",
        ]
        # Nothing from the caller's VAE_* environment may change what is measured.
        super().__init__(cmd, port=port, env=env, log=log_dir / f"{name}.log", name=name, cwd=cwd)
        self.stack = stack
        self.ready_path = ready_path
        self.startup_s = 0.0
        self.whole_session = whole_session

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> None:
        t0 = time.monotonic()
        self.launch()
        try:
            self.wait_ready(timeout, self.ready_path)
        except BaseException:
            self.stop()
            raise
        first_ready = time.monotonic() - t0
        if self.stack.workers > 1:
            # /ready answered by one worker says nothing of the others; they load in parallel,
            # and a worker accepts connections only after its lifespan, so give them as long
            # again as the first one took (the warm-up run then covers any straggler).
            time.sleep(first_ready + 0.5)
            if len(self.worker_pids()) < self.stack.workers:
                raise ServerError(
                    f"{self.name}: fewer than {self.stack.workers} workers\n" + self.log_tail()
                )
        self.startup_s = time.monotonic() - t0

    def worker_pids(self) -> list[int]:
        """The processes that serve: the server itself, or uvicorn's spawned workers, or all
        in its session."""
        if self.whole_session:
            return self._session()
        if self.stack.workers == 1:
            return [self.pid]
        return [
            pid
            for pid in _children(self.pid)
            # multiprocessing's resource tracker is a child too; workers run spawn_main.
            if "spawn_main" in _cmdline(pid)
        ]

    def all_pids(self) -> list[int]:
        if self.whole_session:
            return self._session()
        return [self.pid, *_children(self.pid)] if self.stack.workers > 1 else [self.pid]

    def _session(self) -> list[int]:
        return sorted(pid for pid, proc in proc_table().items() if proc.sid == self.pid)

    def rss_bytes(self) -> int:
        """VmRSS of the serving processes (summed over workers), from /proc."""
        return sum(_rss(pid) for pid in self.worker_pids())

    def cpu_seconds(self) -> float:
        """user + system CPU of the server and all its children so far."""
        return sum(_cpu(pid) for pid in self.all_pids())


@dataclass(frozen=True)
class Proc:
    """What bench needs of one process, from /proc/<pid>/stat."""

    ppid: int
    sid: int
    state: str
    cpu_s: float  # user + system time so far


def read_proc(pid: int) -> Proc | None:
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    # stat(5) after the parenthesised name (which may contain spaces): state ppid pgrp session
    # ... utime and stime, fields 14 and 15, i.e. 11 and 12 here.
    f = stat[stat.rindex(")") + 2 :].split()
    return Proc(int(f[1]), int(f[3]), f[0], (int(f[11]) + int(f[12])) / _CLK_TCK)


def proc_table() -> dict[int, Proc]:
    """Every process on the machine, by pid."""
    pids = (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
    return {pid: proc for pid in pids if (proc := read_proc(pid)) is not None}


def _children(ppid: int) -> list[int]:
    return sorted(pid for pid, proc in proc_table().items() if proc.ppid == ppid)


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _rss(pid: int) -> int:
    try:
        for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return 0


def _cpu(pid: int) -> float:
    proc = read_proc(pid)
    return 0.0 if proc is None else proc.cpu_s


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot, from the first line of /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    # guest time is already counted in user/nice, so only the first 8 columns add up.
    return (sum(values[:8]) - idle) / _CLK_TCK
