"""The model repository: the models this server may serve, found on disk, and those it holds.

The layout is Triton's: `DIR/<name>/<version>/vae.pt`, the version a positive integer; and as
version 1 of a model without version folders, `DIR/<name>/vae.pt` (so `models/`, as the
repository ships it, is a repository) or `DIR/<name>.pt`. `VAE_MODEL_PATH` alone is a
repository of one model, `default`, version 1. Nothing is read outside DIR: every path is
resolved, symlinks included, and must stay inside it.

A model is loaded as a whole: every version on disk, each checked and warmed up before any
serves, then swapped in with one assignment (`_Model.versions`), so a request takes its model
once, at its start (`serving`), and finishes on it even when the model is reloaded or unloaded
meanwhile; requests after an unload get 404. A version whose file is unchanged (the same
sha256) keeps the instance serving it. Loads of one model coalesce, and all loads run one at a
time on a thread of their own, and nothing on the event loop collects or trims after them
(bench/models.py measures what a load still costs the models serving:
docs/benchmarks/models.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import re
import weakref
from collections.abc import Callable, KeysView
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import status

from app.common import listing, shown
from app.errors import NotReadyError, VAEServiceError
from app.model import VAEService
from app.settings import Settings
from scoring.artifact import ModelLoadError

log = logging.getLogger(__name__)

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
NAME_RULE = f"a model name matches {NAME_PATTERN}"
_NAME = re.compile(NAME_PATTERN)
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
ARTIFACT = "vae.pt"
SINGLE = "default"  # the name of VAE_MODEL_PATH's model
NOT_READY = "The model is not loaded yet; try again shortly."


State = Literal["READY", "LOADING", "UNAVAILABLE", "UNLOADED"]
OnSwap = Callable[[str, dict[int, VAEService], dict[int, VAEService]], None]


class InvalidModelNameError(VAEServiceError):
    status_code = status.HTTP_400_BAD_REQUEST


class ModelNotFoundError(VAEServiceError):
    status_code = status.HTTP_404_NOT_FOUND


class ModelLimitError(VAEServiceError):
    """A load that would hold more than VAE_MAX_MODELS versions: refused before it starts."""

    status_code = status.HTTP_409_CONFLICT


class LoadRefusedError(VAEServiceError):
    """A model's artifact cannot be served; what served before keeps serving."""

    status_code = status.HTTP_409_CONFLICT

    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason  # the load's own error, naming the file


class ControlRefusedError(VAEServiceError):
    """Load and unload change one process; with several workers they are refused."""

    status_code = status.HTTP_409_CONFLICT


def parse_version(text: str) -> int:
    """A version from a path: a positive integer, as the repository's folders are named."""
    if not _VERSION.fullmatch(text):
        raise InvalidModelNameError(
            f"Version '{shown(text, 20)}' is not a version: a positive integer."
        )
    return int(text)


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidModelNameError(f"'{shown(name)}' is not a model name: {NAME_RULE}.")
    return name


@dataclass(frozen=True)
class VersionState:
    version: int
    state: State
    reason: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ModelEntry:
    name: str
    state: State  # READY when a version serves
    versions: tuple[VersionState, ...]


@dataclass(frozen=True)
class Swap:
    """What a load did: the versions serving before and after (version -> sha256)."""

    name: str
    before: dict[int, str]
    after: dict[int, str]

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def sha256(self) -> str:
        return self.after[max(self.after)]

    @property
    def previous_sha256(self) -> str | None:
        return self.before[max(self.before)] if self.before else None


@dataclass
class _Model:
    versions: dict[int, VAEService] = field(default_factory=dict)  # serving; swapped whole
    loading: asyncio.Future[Swap] | None = None
    failed: dict[int, str] = field(default_factory=dict)  # the last load's refusals
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one load or unload at a time


class ModelRepository:
    def __init__(self, settings: Settings, on_swap: OnSwap | None = None) -> None:
        self.settings = settings
        self.on_swap = on_swap
        repository = settings.model_repository
        self.root = repository.resolve() if repository is not None else None
        self._models: dict[str, _Model] = {}
        self.started = False
        self.default: str | None = None
        self._loader: ThreadPoolExecutor | None = None
        self._reserved = 0  # versions being loaded, not yet held

    # -- what there is -------------------------------------------------------------------------

    def on_disk(self) -> dict[str, dict[int, Path]]:
        """Every model the repository holds: name -> version -> artifact, inside the root."""
        if self.root is None:
            return {SINGLE: {1: self.settings.model_path}}
        found: dict[str, dict[int, Path]] = {}
        try:
            entries = sorted(self.root.iterdir())
        except OSError as e:
            raise ModelLoadError(f"{self.root}: cannot read the model repository ({e}).") from None
        for entry in entries:
            if entry.suffix == ".pt" and _NAME.fullmatch(entry.stem) and self._inside(entry):
                found.setdefault(entry.stem, {})[1] = entry
            elif entry.is_dir() and _NAME.fullmatch(entry.name) and self._inside(entry):
                versions = {v: entry / str(v) / ARTIFACT for v in self._versions(entry)}
                # A folder holding vae.pt itself, without versions (as models/ ships): version 1.
                direct = entry / ARTIFACT
                if not versions and direct.is_file() and self._inside(direct):
                    versions = {1: direct}
                if versions:
                    found.setdefault(entry.name, {}).update(versions)
        return found

    def _versions(self, folder: Path) -> list[int]:
        try:
            children = list(folder.iterdir())
        except OSError:
            return []
        return sorted(
            int(c.name)
            for c in children
            if _VERSION.fullmatch(c.name)
            and (c / ARTIFACT).is_file()
            and self._inside(c / ARTIFACT)
        )

    def _inside(self, path: Path) -> bool:
        """Whether `path`, every link followed, lies within the repository."""
        assert self.root is not None
        try:
            return path.resolve(strict=True).is_relative_to(self.root)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            return False

    def index(self) -> list[ModelEntry]:
        """Every model on disk or loaded, with each version's state."""
        disk = self.on_disk()
        out = []
        for name in sorted(set(disk) | set(self._models)):
            model = self._models.get(name)
            serving = model.versions if model is not None else {}
            loading = model is not None and model.loading is not None
            failed = model.failed if model is not None else {}
            versions = []
            for v in sorted(set(disk.get(name, {})) | set(serving) | set(failed)):
                if v in serving:
                    versions.append(VersionState(v, "READY", None, serving[v].sha256))
                elif loading:
                    versions.append(VersionState(v, "LOADING"))
                elif v in failed:
                    versions.append(VersionState(v, "UNAVAILABLE", failed[v]))
                else:
                    versions.append(VersionState(v, "UNLOADED", "not loaded"))
            state: State = (
                "READY" if serving else "LOADING" if loading else
                "UNAVAILABLE" if failed else "UNLOADED"
            )  # fmt: skip
            out.append(ModelEntry(name, state, tuple(versions)))
        return out

    def entry(self, name: str) -> ModelEntry:
        check_name(name)
        for e in self.index():
            if e.name == name:
                return e
        raise ModelNotFoundError(self._unknown(name))

    def held(self) -> KeysView[str]:
        """The models loaded or loading (a live view: V2 reads it on every request)."""
        return self._models.keys()

    def loaded(self) -> dict[str, dict[int, VAEService]]:
        return {name: dict(m.versions) for name, m in self._models.items() if m.versions}

    @property
    def count(self) -> int:
        """Versions held in memory."""
        return sum(len(m.versions) for m in self._models.values())

    # -- serving -------------------------------------------------------------------------------

    def serving(self, name: str | None = None, version: int | None = None) -> VAEService:
        """The model a request runs on: the highest ready version, or the one asked for; the
        default model when no name is given. Taken once per request."""
        if not self.started:
            raise NotReadyError(NOT_READY)
        if name is None:
            if self.default is None:
                raise ModelNotFoundError(
                    "This server serves several models and no default (VAE_DEFAULT_MODEL); "
                    "name one in the path: /models/{name}/..."
                )
            name = self.default
        else:
            check_name(name)
        model = self._models.get(name)
        if model is None or not model.versions:
            if model is not None and model.loading is not None:
                raise NotReadyError(f"Model '{name}' is loading; try again shortly.")
            raise ModelNotFoundError(self._unknown(name))
        versions = model.versions
        if version is None:
            return versions[max(versions)]
        vae = versions.get(version)
        if vae is None:
            raise ModelNotFoundError(
                f"Model '{name}' has no version {version} loaded; its versions are "
                f"{listing([str(v) for v in sorted(versions)])}."
            )
        return vae

    def is_ready(self, name: str | None = None, version: int | None = None) -> bool:
        try:
            self.serving(name, version)
        except NotReadyError:
            return False
        return True

    def all_ready(self) -> bool:
        """Every model the server was asked to serve is ready: those loaded at start (one
        that fails stops start-up), and those loaded since (a load is answered once its
        versions serve, and a refused one serves nothing new). A model loading for the first
        time is not yet asked for: the server stays ready for the others meanwhile."""
        return self.started

    def _unknown(self, name: str) -> str:
        disk = self.on_disk()
        if name in disk:
            where = f"POST /v2/repository/models/{name}/load or /admin/models/{name}/load"
            return f"Model '{name}' is not loaded; load it with {where}."
        names = sorted(n for n, m in self._models.items() if m.versions)
        served = f"the models served are {listing(names)}" if names else "no model is loaded"
        return f"No model '{name}' here; {served}."

    # -- load and unload -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load what the control mode loads at start: every model (`all`), or only the
        default one (`explicit`, with VAE_DEFAULT_MODEL). A model that fails stops start-up."""
        disk = self.on_disk()
        if self.root is None:
            self.default = SINGLE
        elif self.settings.default_model is not None:
            self.default = check_default(self.settings.default_model, disk, self.root)
        elif len(disk) == 1:
            self.default = next(iter(disk))
        names = list(disk) if self.settings.model_control == "all" else []
        if self.settings.model_control == "explicit" and self.default is not None:
            names = [self.default]
        if self.root is not None and not disk and self.settings.model_control == "all":
            log.warning("the model repository %s holds no model", self.root)
        for name in names:
            try:
                await self.load(name, one_worker=False)
            except LoadRefusedError as e:
                where = "" if self.root is None else f"model '{name}': "
                raise ModelLoadError(where + e.reason) from None
            except VAEServiceError as e:
                raise ModelLoadError(e.detail) from None
        self.started = True

    async def load(
        self, name: str, expected_sha256: str | None = None, *, one_worker: bool = True
    ) -> Swap:
        """Load (or reload) every version of `name` on disk and swap them in at once. A load
        asked for while one of the same model runs gets that one's outcome (ask again after
        it to pick up files replaced meanwhile). Refusals raise and leave what served.
        `one_worker`: a load that changes this worker alone, refused when there are several
        (the start-up's and the default model's reload, which every worker follows, are not)."""
        check_name(name)
        if one_worker:
            self._check_control()
        model = self._models.setdefault(name, _Model())
        if model.loading is None:
            model.loading = asyncio.ensure_future(self._load(name, model, expected_sha256))

            def done(_: object) -> None:
                model.loading = None

            model.loading.add_done_callback(done)
        # Shielded: a caller that goes away does not cancel the load the others wait for.
        return await asyncio.shield(model.loading)

    async def _load(self, name: str, model: _Model, expected_sha256: str | None) -> Swap:
        async with model.lock:
            # An unload that held the lock before us took the model out: put it back, or this
            # load would fill a model the repository no longer holds.
            self._models[name] = model
            versions = self.on_disk().get(name)
            if not versions:
                if not model.versions:
                    self._models.pop(name, None)
                raise ModelNotFoundError(self._unknown_on_disk(name))
            before = model.versions
            # Versions other loads are reading meanwhile count too: two loads at once must not
            # pass the bound between them.
            held = self.count - len(before) + self._reserved
            if held + len(versions) > self.settings.max_models:
                raise ModelLimitError(
                    f"Loading '{name}' ({len(versions)} version(s)) would hold "
                    f"{held + len(versions)} models, over VAE_MAX_MODELS="
                    f"{self.settings.max_models}; unload one first."
                )
            top = max(versions)
            after: dict[int, VAEService] = {}
            failed: dict[int, str] = {}
            self._reserved += len(versions)
            try:
                for version, path in sorted(versions.items()):
                    pin = self._pin(name, version) or (expected_sha256 if version == top else None)
                    current = before.get(version)
                    try:
                        after[version] = await self._run(self._load_version, name, version,
                                                         path, pin, current)  # fmt: skip
                    except ModelLoadError as e:
                        failed[version] = str(e)
            finally:
                self._reserved -= len(versions)
            model.failed = failed  # kept, so the index says why
            if failed:
                first = failed[min(failed)]
                raise LoadRefusedError(
                    f"Model '{name}' was not loaded; what served before keeps serving: {first}",
                    first,
                )
            model.versions = after
            swap = Swap(name, _shas(before), _shas(after))
            if swap.changed:
                if self.on_swap is not None:
                    self.on_swap(name, before, after)
                self._forget(before, after)
                log.info("model %s: versions %s serving (sha256 %s)", name,
                         sorted(after), swap.sha256)  # fmt: skip
            else:
                log.info("model %s: unchanged (sha256 %s)", name, swap.sha256)
            return swap

    def _unknown_on_disk(self, name: str) -> str:
        where = self.root if self.root is not None else self.settings.model_path
        return f"No model '{name}' in the repository {where}."

    def _load_version(
        self, name: str, version: int, path: Path, pin: str | None, current: VAEService | None
    ) -> VAEService:
        unchanged = current is not None and file_sha256(path) == current.sha256
        if current is not None and unchanged and pin in (None, current.sha256):
            return current
        pinned_by = "VAE_MODEL_SHA256" if self.root is None else "VAE_MODEL_PINS"
        vae = VAEService.load(path, self.settings.device, pin, pinned_by)
        vae.name, vae.version = name, version
        vae.artifact = path.name if self.root is None else str(path.relative_to(self.root))
        vae.warm_up(self.settings.max_batch_size)
        return vae

    def _pin(self, name: str, version: int) -> str | None:
        if self.root is None:
            return self.settings.model_sha256
        pins = self.settings.pins()
        return pins.get(f"{name}/{version}") or pins.get(name)

    async def unload(self, name: str) -> list[int]:
        """Stop serving `name`; requests in flight finish on it, later ones get 404."""
        check_name(name)
        self._check_control()
        model = self._models.get(name)
        if model is None or not model.versions:
            raise ModelNotFoundError(f"Model '{name}' is not loaded.")
        async with model.lock:
            before = model.versions
            model.versions = {}
            self._models.pop(name, None)
            if self.on_swap is not None:
                self.on_swap(name, before, {})
            self._forget(before, {})
        log.info("model %s: unloaded versions %s", name, sorted(before))
        return sorted(before)

    def _check_control(self) -> None:
        if self.settings.workers > 1:
            raise ControlRefusedError(
                "Loading and unloading change one worker, and this server runs "
                f"{self.settings.workers} (VAE_WORKERS); restart it with the repository "
                "changed instead."
            )

    def _forget(self, before: dict[int, VAEService], after: dict[int, VAEService]) -> None:
        """Hand the memory of the instances no longer held back to the OS. They are freed by
        reference counting alone (no cycles hold them), when the last request in flight on
        them ends; a full gc.collect() here held the event loop for 20 to 70 ms. Loading ran
        on the loader thread, whose malloc arena keeps what torch freed there, so trim the heap
        (malloc_trim, which releases the GIL) on that thread, now and once each old instance is
        gone, or each load would leave RSS a step higher."""
        kept = {id(v) for v in after.values()}
        for old in before.values():
            if id(old) not in kept:
                weakref.finalize(old, self._trim_later)
        self._trim_later()

    def _trim_later(self) -> None:
        if self._loader is not None:
            with contextlib.suppress(RuntimeError):  # shut down meanwhile: nothing to trim
                self._loader.submit(trim_heap)

    async def _run(self, fn: Callable[..., VAEService], *args: object) -> VAEService:
        if self._loader is None:
            self._loader = ThreadPoolExecutor(1, thread_name_prefix="vae-load")
        return await asyncio.get_running_loop().run_in_executor(self._loader, fn, *args)

    def close(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=False, cancel_futures=True)
            self._loader = None


def check_default(name: str, disk: dict[str, dict[int, Path]], root: Path) -> str:
    check_name(name)
    if name not in disk:
        raise ModelLoadError(
            f"VAE_DEFAULT_MODEL={name}, but the repository {root} has no such model; it has "
            f"{listing(sorted(disk)) if disk else 'none'}."
        )
    return name


def _shas(versions: dict[int, VAEService]) -> dict[int, str]:
    return {v: vae.sha256 for v, vae in versions.items()}


def file_sha256(path: Path) -> str | None:
    """The file's sha256, or None when it cannot be read (the load then says why)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim this way
        ctypes.CDLL("libc.so.6").malloc_trim(0)
