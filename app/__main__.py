"""Serve the artifact at VAE_MODEL_PATH: `python -m app` (settings from VAE_* variables)."""

from __future__ import annotations

import logging

import uvicorn

from app.main import create_app
from app.settings import Settings


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Let SIGTERM finish in-flight requests rather than cut them.
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
