"""Serve the artifact at VAE_MODEL_PATH: `python -m app` (settings from VAE_* variables)."""

from __future__ import annotations

import sys

import uvicorn

from app.lifecycle import uvicorn_grace_s
from app.observability import configure_logging
from app.settings import Settings
from app.workers import Supervisor, prepare_run_dir


def main() -> None:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers > 1:  # before the workers start: they inherit the environment
        prepare_run_dir(settings.run_dir)
    # An import string and a factory, so that with several workers each process builds its
    # own app (and loads its own model) from the same VAE_* environment.
    config = uvicorn.Config(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop=settings.event_loop,
        http=settings.http,
        log_level=settings.log_level,
        root_path=settings.root_path,
        log_config=None,  # keep configure_logging's handlers: one format for every line
        access_log=False,  # app.observability logs each request, with its id
        # What is left for uvicorn after the app's own drain (app/lifecycle.py).
        timeout_graceful_shutdown=uvicorn_grace_s(settings),
    )
    if settings.workers > 1:
        # uvicorn.run's path for workers, with our supervisor (app/workers.py: SIGHUP reloads).
        Supervisor(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn.run's STARTUP_FAILURE: the model did not load


if __name__ == "__main__":
    main()
