"""Property-based fuzzing of live servers with schemathesis, from their own /openapi.json, and
a hand-written corpus of extreme values.

    python -m bench.fuzz                       # about 4,000 generated cases, several minutes
    python -m bench.fuzz --max-examples 20     # a quick pass

Three servers, one after the other: an image model (uploads, PNG answers, attribution), the
shipped table model (records by feature name, V2 named inputs, top features), and the image
model behind a proxy's root path (VAE_ROOT_PATH=/vae: a prefix must neither open /admin nor
close the probes). Every check schemathesis has runs (no 5xx, documented status codes, content
types, headers and response schemas, rejection of schema-invalid input, 405 for undeclared
methods), except one: `positive_data_acceptance`, which expects every schema-valid request to
succeed. Ours cannot all succeed: the schema gives each limit on its own (instances, samples,
widths), but their product is bounded too (VAE_MAX_TOTAL_SAMPLES), and JSON Schema cannot say
that. Those requests get a documented 422, which the other checks still verify.

The extremes: each table feature set to 10^3 ... 10^38 and their negatives, over REST JSON
(instances and records, with attribution and top features), .npy and V2; every answer must be
a 200 whose decision percentile is a number (an input beyond what the model represents is
flagged, never decided with a null), or a 422 for values beyond float32.

The hostile names: dot segments, separators, control characters, unicode and over-long names
on every route that takes a model name (REST, V2, the repository's load and unload), sent
byte for byte; each must get a 4xx in its protocol's shape (image target).

The servers run with an admin key (VAE_ADMIN_KEYS, which opens every route), sent with every
request, so /admin/reload and the repository's load are fuzzed too (unload is left to the
names corpus: the documented example name would unload the model serving).
"""

from __future__ import annotations

import argparse
import http.client
import io
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from bench.artifact import build_artifact
from bench.servers import REPO, SERVICE_STACK, Server, free_port

KEY = "fuzz-key"
SKIPPED_CHECKS = "positive_data_acceptance"


@dataclass(frozen=True)
class FuzzResult:
    returncode: int
    cases: int
    output: str


def fuzz(url: str, max_examples: int, *, seed: int = 0, key: str = KEY) -> FuzzResult:
    """Run schemathesis against `url` (the server's base URL) and count the cases it generated.

    The requests go to `url` itself, not to the schema's `servers` entry: behind a root path
    that entry names the proxy's prefix, which the proxy strips before the server sees it."""
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
        "--url", url,
        "--checks", "all", "--exclude-checks", SKIPPED_CHECKS,
        "--max-examples", str(max_examples), "--seed", str(seed),
        "--header", f"Authorization: Bearer {key}",
        "--request-timeout", "60", "--no-color",
        # No example database: a run depends on its seed alone, and writes nothing here.
        "--generation-database", "none",
        # An unload of the model serving (its name is the documented example) would leave
        # every later case a 404: the names corpus below sends unloads instead.
        "--exclude-path-regex", "/unload$",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    match = re.search(r"(\d+) generated", output)
    return FuzzResult(proc.returncode, int(match.group(1)) if match else 0, output)


EXTREMES = [sign * 10.0**e for e in range(3, 39) for sign in (1, -1)]


def extremes(url: str, key: str = KEY, features: int | None = None) -> tuple[int, list[str]]:
    """The extreme-value corpus against a table model's server, for its first `features`
    features (all by default): (cases sent, failures)."""
    auth = {"Authorization": f"Bearer {key}"}
    failures: list[str] = []
    with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
        listed = http.get("/model").json()["features"]
        names = [f["name"] for f in listed]
        normal = np.array([f["mean"] for f in listed], dtype=np.float64)
        cases = 0
        for j, name in enumerate(names[:features]):
            for value in EXTREMES:
                row = normal.copy()
                row[j] = value
                for how, answer in _send_every_way(http, names, row):
                    cases += 1
                    if problem := _judge(answer, how):
                        failures.append(f"{name}={value:g} {how}: {problem}")
    return cases, failures


def _send_every_way(
    http: httpx.Client, names: list[str], row: np.ndarray
) -> list[tuple[str, httpx.Response]]:
    record = dict(zip(names, row.tolist(), strict=True))
    opts = {"seed": 0, "attribution": True, "top_features": 3}
    buf = io.BytesIO()
    np.save(buf, row[None].astype(np.float32), allow_pickle=False)
    v2 = {"inputs": [{"name": n, "shape": [1], "datatype": "FP64", "data": [v]}
                     for n, v in record.items()], "parameters": {"seed": 0}}  # fmt: skip
    return [
        ("records", http.post("/anomaly-score", json={"records": [record], **opts})),
        ("instances", http.post("/anomaly-score", json={"instances": [row.tolist()], **opts})),
        (".npy", http.post("/anomaly-score?seed=0&attribution=true", content=buf.getvalue(),
                           headers={"content-type": "application/x-npy"})),
        ("v2", http.post("/v2/models/vae-anomaly/infer", json=v2)),
    ]  # fmt: skip


def _judge(r: httpx.Response, how: str) -> str | None:
    if r.status_code >= 500:
        return f"{r.status_code} {r.text[:200]}"
    if r.status_code in (400, 422):
        beyond = "too large for float32" in r.text or "too large" in r.text
        return None if beyond else f"{r.status_code} {r.text[:200]}"
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    body = r.json()
    if how == "v2":
        outputs = {o["name"]: o["data"] for o in body["outputs"]}
        decision = body["parameters"]["decision_score"]
        percentile, flagged = outputs[f"{decision}_percentile"], outputs["is_anomaly"]
    else:
        decision = body["decision_score"]
        percentile, flagged = body["percentiles"][decision], body["is_anomaly"]
    if percentile[0] is None or not 0.0 <= percentile[0] <= 1.0:
        return f"decision percentile {percentile[0]!r}"
    if percentile[0] == 1.0 and not flagged[0]:
        return "beyond every normal row, yet not flagged"
    return None


# Names a caller must not be able to use to reach anything: dot segments, separators, control
# characters, unicode, over-long and empty-looking ones (percent-encoded as sent on the wire).
HOSTILE_NAMES = ["..", ".", "%2E%2E", "..%2F..%2Fetc", "-x", "_x", "a" * 65, "%C3%A9t%C3%A9",
                 "a%20b", "%00", "a%0A", "%E2%80%AE", "%F0%9F%98%80", "a.pt%00", "CON"]  # fmt: skip
NAME_ROUTES = [("POST", f"/models/{{}}/{op}") for op in ("encode", "decode", "sample",
               "anomaly-score")] + [
    ("POST", "/models/{}/versions/1/encode"), ("GET", "/models/{}"), ("GET", "/models/{}/ready"),
    ("GET", "/models/{}/versions/1"), ("POST", "/admin/models/{}/load"),
    ("POST", "/admin/models/{}/unload"), ("GET", "/v2/models/{}"),
    ("GET", "/v2/models/{}/versions/1/ready"), ("POST", "/v2/models/{}/infer"),
    ("POST", "/v2/models/{}/versions/1/infer"), ("POST", "/v2/repository/models/{}/load"),
    ("POST", "/v2/repository/models/{}/unload"),
]  # fmt: skip


def hostile_names(url: str, key: str = KEY) -> tuple[int, list[str]]:
    """Every hostile name on every route that takes a model name, the path sent byte for byte
    (an HTTP client would resolve the dot segments first): each answer must be a 4xx in its
    protocol's shape, and the model must serve on after. (cases sent, failures)."""
    failures: list[str] = []
    cases = 0
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = b'{"instances": [[0.0]]}'
    for name in HOSTILE_NAMES:
        for method, route in NAME_ROUTES:
            path = route.format(name)
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            try:
                conn.putrequest(method, path, skip_accept_encoding=True)
                conn.putheader("Authorization", f"Bearer {key}")
                conn.putheader("Content-Type", "application/json")
                conn.putheader("Content-Length", str(len(body) if method == "POST" else 0))
                conn.endheaders(body if method == "POST" else None)
                answer = conn.getresponse()
                status, text = answer.status, answer.read().decode(errors="replace")
            finally:
                conn.close()
            cases += 1
            shape = '"error"' if path.startswith("/v2") else '"detail"'
            if not 400 <= status < 500 or shape not in text:
                failures.append(f"{method} {path}: {status} {text[:200]}")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        if client.get("/models/default").status_code != 200:
            failures.append("the default model no longer serves after the hostile names")
    return cases, failures


TARGETS = ("image", "table", "root-path")


def serve(target: str, work: Path) -> dict[str, str]:
    """The server's environment for a target."""
    env = {"VAE_API_KEYS": "fuzz-client-key", "VAE_ADMIN_KEYS": KEY, "VAE_LOG_LEVEL": "warning"}
    if target == "table":
        return {**env, "VAE_MODEL_PATH": str(REPO / "models" / "breast-cancer" / "vae.pt")}
    image = work / "vae.pt"
    if not image.exists():
        build_artifact(image)
    if target == "root-path":
        return {**env, "VAE_MODEL_PATH": str(image), "VAE_ROOT_PATH": "/vae"}
    return {**env, "VAE_MODEL_PATH": str(image)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=100, help="per operation (default 100)")
    p.add_argument("--min-cases", type=int, default=1000, help="fail below this many cases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    args = p.parse_args(argv)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for target in args.targets:
            env = serve(target, work)
            with Server(
                f"service-{target}", "app.main:create_app", SERVICE_STACK, port=free_port(),
                ready_path="/ready", env=env, log_dir=work,
            ) as server:  # fmt: skip
                result = fuzz(server.url, args.max_examples, seed=args.seed)
                cases, failures = extremes(server.url) if target == "table" else (0, [])
                if target == "image":
                    named, name_failures = hostile_names(server.url)
                    cases, failures = cases + named, failures + name_failures
                log = (work / f"service-{target}.log").read_text()
            print(result.output)
            errors = log.count("Traceback")
            print(f"{target}: {result.cases} cases generated; schemathesis exit "
                  f"{result.returncode}; {cases} extreme-value and hostile-name cases, "
                  f"{len(failures)} failed; "
                  f"{errors} tracebacks in the server log")  # fmt: skip
            for failure in failures[:20]:
                print(f"  {failure}")
            ok &= result.returncode == 0 and result.cases >= args.min_cases
            ok &= not failures and errors == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
