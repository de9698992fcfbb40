"""Several worker processes that act as one server: shared metrics, and reloads that reach all.

`python -m app` with VAE_WORKERS > 1 runs uvicorn's supervisor with one folder shared by its
workers (VAE_RUN_DIR, else a fresh temporary one):

- `metrics/`: prometheus-client's multiprocess mode. Every worker writes its counters and
  histograms there, and `/metrics`, answered by any worker, adds them all up; without it a
  scrape sees one worker at random (KServe issue 2979 is the same pain).
- `workers/<pid>`: the sha256 each worker serves, rewritten at start-up and after each reload.
- `reload.json`: the last reload asked for over HTTP: its id and the sha256 it loaded.

`POST /admin/reload` reloads the worker that got it, then sends SIGHUP to the others; each
loads VAE_MODEL_PATH again and keeps its old model unless the file's sha256 is the one the
first worker loaded (and VAE_MODEL_SHA256's, when pinned), so a file replaced in between cannot
split the workers between two models. The answer comes once they all serve it, or says how
many do. SIGHUP to the supervisor is forwarded to every worker, which reloads in place with the
same checks; uvicorn's own answer, a restart of every worker, would take the service down with
a bad artifact instead of refusing it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from uvicorn.supervisors import Multiprocess

log = logging.getLogger(__name__)

RUN_DIR_ENV = "VAE_RUN_DIR"
# Read by prometheus_client when it is imported: set before the workers start.
PROMETHEUS_ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_run_dir(configured: Path | None) -> Path:
    """The shared folder, emptied of a previous run's files (stale metrics would add up with
    the new), with its environment set for the workers to inherit."""
    root = configured or Path(tempfile.mkdtemp(prefix="vae-service-"))
    for part in ("metrics", "workers"):
        shutil.rmtree(root / part, ignore_errors=True)
        (root / part).mkdir(parents=True)
    (root / "reload.json").unlink(missing_ok=True)
    os.environ[RUN_DIR_ENV] = str(root)
    os.environ[PROMETHEUS_ENV] = str(root / "metrics")
    return root


class Supervisor(Multiprocess):
    """uvicorn's supervisor, but SIGHUP reloads each worker in place instead of replacing it."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: reloading every worker")
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


class Siblings:
    """This worker's view of the others, through the shared folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pid = os.getpid()
        self.handled: str | None = None  # the last reload request this worker acted on

    @classmethod
    def from_environ(cls) -> Siblings | None:
        """This worker's siblings when `python -m app` prepared a run folder for several; None
        for a single process (VAE_RUN_DIR may be set there too, and is then unused)."""
        root = os.environ.get(RUN_DIR_ENV)
        if not root or not os.environ.get(PROMETHEUS_ENV) or not (Path(root) / "workers").is_dir():
            return None
        return cls(Path(root))

    def record(self, sha256: str) -> None:
        """Say which artifact this worker serves (atomically: readers never see half)."""
        path = self.root / "workers" / str(self.pid)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(sha256)
        os.replace(tmp, path)

    def leave(self) -> None:
        (self.root / "workers" / str(self.pid)).unlink(missing_ok=True)
        with contextlib.suppress(ImportError, OSError):
            from prometheus_client import multiprocess

            # Its live gauges stop counting.
            multiprocess.mark_process_dead(self.pid)  # type: ignore[no-untyped-call]

    def serving(self) -> dict[int, str]:
        """The sha256 each live worker serves, this one included."""
        out = {}
        for path in (self.root / "workers").iterdir():
            if not path.name.isdigit():
                continue
            pid = int(path.name)
            try:
                os.kill(pid, 0)
                out[pid] = path.read_text()
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                continue
        return out

    def ask_others_to_reload(self, sha256: str) -> list[int]:
        """Record the request and signal the other live workers; their pids."""
        self.handled = request_id = uuid.uuid4().hex
        request = {"id": request_id, "sha256": sha256, "by": self.pid, "at": time.time()}
        tmp = self.root / "reload.json.tmp"
        tmp.write_text(json.dumps(request))
        os.replace(tmp, self.root / "reload.json")
        others = [pid for pid in self.serving() if pid != self.pid]
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        return others

    def expected_sha256(self) -> str | None:
        """On SIGHUP: the sha256 a sibling's reload loaded, when that request is new to this
        worker; None for a SIGHUP of the operator's, which checks only VAE_MODEL_SHA256."""
        try:
            request: dict[str, Any] = json.loads((self.root / "reload.json").read_text())
        except (OSError, ValueError):
            return None
        request_id, sha = request.get("id"), request.get("sha256")
        # A request is a sibling's reload of moments ago; an old one is from before this
        # worker's time (a replacement worker, then an operator's SIGHUP).
        fresh = time.time() - float(request.get("at", 0.0)) < 60.0
        if not isinstance(request_id, str) or request_id == self.handled or not fresh:
            return None
        self.handled = request_id
        return sha if isinstance(sha, str) else None
