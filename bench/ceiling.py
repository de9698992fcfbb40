"""The ceiling: the cheapest POST a FastAPI app on this uvicorn stack can answer.

The handler never touches the body: it measures HTTP parsing, routing and the response path
only, so any service's req/s on the same body and stack can at best equal this.
"""

from __future__ import annotations

from fastapi import FastAPI, Response

# Pre-encoded, so not even JSON serialisation of the answer is measured.
_OK = b'{"ok":true}'


def create_app() -> FastAPI:
    """Factory for `uvicorn --factory bench.ceiling:create_app`."""
    app = FastAPI(title="bench-ceiling")

    @app.get("/health")
    async def health() -> Response:
        return Response(content=_OK, media_type="application/json")

    @app.post("/sink")
    async def sink() -> Response:
        # No body parameter: FastAPI does not read or parse the request body at all; uvicorn
        # has already received it off the socket, which is the part every endpoint pays.
        return Response(content=_OK, media_type="application/json")

    return app
