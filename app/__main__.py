"""Serve the artifact at VAE_MODEL_PATH: `python -m app` (settings from VAE_* variables)."""

from __future__ import annotations

import logging

import uvicorn

from app.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # An import string and a factory, so that with several workers each process builds its
    # own app (and loads its own model) from the same VAE_* environment.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop=settings.loop,
        http=settings.http,
        log_level=settings.log_level,
        # Let SIGTERM finish in-flight requests rather than cut them.
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
