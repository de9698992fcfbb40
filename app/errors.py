"""Domain exceptions and their one mapping to HTTP.

Every error answer has a one-sentence reason: in FastAPI's `{"detail": ...}` shape, or in
`{"error": ...}` under /v2, the shape V2 clients read (`error_payload`).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.common import routed_path

log = logging.getLogger(__name__)


class ErrorResponse(BaseModel):
    detail: str = Field(
        description="One sentence saying what was wrong.",
        examples=["instances[2] has 783 values; this model takes 784 (or a 28x28 array)."],
    )


class VAEServiceError(Exception):
    """Base of the errors the service answers with a 4xx or 503."""

    status_code = status.HTTP_500_INTERNAL_SERVER_ERROR

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInputError(VAEServiceError):
    status_code = status.HTTP_422_UNPROCESSABLE_CONTENT


class UnsupportedMediaTypeError(VAEServiceError):
    status_code = status.HTTP_415_UNSUPPORTED_MEDIA_TYPE


class NotReadyError(VAEServiceError):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE


class ReloadRefusedError(VAEServiceError):
    """The artifact at VAE_MODEL_PATH cannot replace the one serving; the old one stays."""

    status_code = status.HTTP_409_CONFLICT


V2_PREFIX = "/v2"


def speaks_v2(path: str) -> bool:
    """Whether `path` belongs to the Open Inference Protocol, whose errors read `{"error": ...}`."""
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def error_payload(detail: str, *, v2: bool = False) -> dict[str, str]:
    """An error answer's body: the service's `{"detail": ...}`, or V2's `{"error": ...}`."""
    return {"error": detail} if v2 else {"detail": detail}


def describe_validation_error(exc: RequestValidationError) -> str:
    """One sentence from pydantic's errors, e.g. "instances[2][5]: Input should be a finite number."

    A union (flat or nested instance) reports one error per branch; the deepest one is the
    branch the client meant, and an error about the value beats one about the container.
    """
    errors = exc.errors()
    first = max(errors, key=lambda e: (len(_plain_loc(e)), e.get("type") != "list_type"))
    loc = _plain_loc(first)
    if first.get("type") == "extra_forbidden":
        if loc and loc[0] == "query":
            return f"Unknown query parameter '{loc[-1]}'."
        return f"Unknown field '{loc[-1]}' in the request body."
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    if first.get("type") == "missing" and len(loc) <= 1:
        return "The request body is missing or empty."
    if first.get("type") in ("model_type", "dict_type") and loc in ([], ["body"]):
        return "The request body must be a JSON object."
    where = _format_loc(loc)
    msg = str(first.get("msg", "invalid value")).rstrip(".")
    return f"{where}: {msg}." if where else f"{msg}."


def _plain_loc(error: Any) -> list[str]:
    # Union branches appear in loc as their type, e.g. "list[float]"; they mean nothing to a client.
    return [str(p) for p in error.get("loc", ()) if not (isinstance(p, str) and "[" in p)]


def _format_loc(loc: list[str]) -> str:
    # ["body", "instances", "2", "5"] -> "instances[2][5]"
    parts = loc[1:] if loc and loc[0] == "body" else loc
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette's outermost layer calls this for anything no route caught, then re-raises it
        # for the server's own traceback: the client gets the protocol's JSON and an id that
        # finds that traceback in the log, never the error's text.
        request_id = getattr(request.state, "request_id", "unknown")
        log.error("unexpected %s in request %s", type(exc).__name__, request_id)
        detail = f"The server failed on this request (request id {request_id}); it keeps serving."
        v2 = speaks_v2(routed_path(request.scope))
        # Sent past Observe's wrapper, so the id header is set here.
        headers = {"x-request-id": request_id}
        return JSONResponse(error_payload(detail, v2=v2), status_code=500, headers=headers)

    @app.exception_handler(VAEServiceError)
    async def _service_error(_: Request, exc: VAEServiceError) -> JSONResponse:
        return JSONResponse(error_payload(exc.detail), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_payload(describe_validation_error(exc)),
            status_code=status.HTTP_422_UNPROCESSABLE_CONTENT,
        )
