"""The limit: a bare ASGI callable on the same uvicorn stack, no framework at all.

It reads the whole body with one `receive()` loop and answers fixed JSON with two sends:
HTTP parsing and the ASGI round trip, which every Python server on this stack pays, and
nothing else. The FastAPI ceiling (bench/ceiling.py) adds the framework to it; the service
adds the model and its checks.
"""

from __future__ import annotations

from starlette.types import Receive, Scope, Send

_OK = b'{"ok":true}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_OK))]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":  # nothing to start or stop
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:  # the whole body, as any endpoint that reads it must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _OK})


def create_app() -> object:
    """Factory for `uvicorn --factory bench.bare:create_app`, as the other servers are run."""
    return app
