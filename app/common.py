"""Names that several modules share, each defined once: array types, score names, media types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from scoring import Array as Array  # defined once, in the core; re-exported for app/

Arrays = dict[str, Array]  # an operation's outputs, by name

# The anomaly scores an artifact can be asked for; its calibration states each one's direction.
# Format-1 artifacts offer the first three; format 2 adds the next three, format 3 the latent
# distance and the ensemble, format 4 RaPP, format 5 the polar distance, format 7 (table
# models) the input distance and format 9 (image models) the feature distance
# (scoring/scores.py).
ScoreName = Literal[
    "kl_divergence",
    "reconstruction_log_prob",
    "log_likelihood",
    "input_complexity",
    "likelihood_ratio",
    "dose",
    "latent_distance",
    "latent_polar_distance",
    "rapp",
    "input_distance",
    "feature_distance",
    "ensemble",
]
SCORES: tuple[ScoreName, ...] = get_args(ScoreName)


def listing(names: Sequence[str], conj: str = "and") -> str:
    """Names as a sentence lists them: a; a and b; a, b and c."""
    return ", ".join(names[:-1]) + f" {conj} {names[-1]}" if len(names) > 1 else names[0]


def shown(text: str, limit: int = 80) -> str:
    """Text a caller sent, as an error sentence quotes it: as it is when short and printable,
    else the repr of its first `limit` characters (no control character reaches a log)."""
    return text if len(text) <= limit and text.isprintable() else repr(text[:limit])


def routed_path(scope: Mapping[str, Any]) -> str:
    """An ASGI scope's `path` without the root path (uvicorn --root-path, a Ray route_prefix)
    that ASGI puts in front of it: the path the router matches, as Starlette reads it (its own
    helper, starlette._utils.get_route_path, is private)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


# The status the log and the metrics give a request whose client hung up first (nginx's).
CLIENT_GONE = 499

JSON = "application/json"
NPY = "application/x-npy"
OCTET = "application/octet-stream"
PNG = "image/png"
MULTIPART = "multipart/form-data"
