"""Property-based fuzzing of a live server with schemathesis, from its own /openapi.json.

    python -m bench.fuzz                       # about 1,700 generated cases, two or three minutes
    python -m bench.fuzz --max-examples 20     # a quick pass

Every check schemathesis has runs (no 5xx, documented status codes, content types, headers and
response schemas, rejection of schema-invalid input, 405 for undeclared methods), except one:
`positive_data_acceptance`, which expects every schema-valid request to succeed. Ours cannot
all succeed: the schema gives each limit on its own (instances, samples, widths), but their
product is bounded too (VAE_MAX_TOTAL_SAMPLES), and JSON Schema cannot say that. Those
requests get a documented 422, which the other checks still verify.

The server runs with an API key, sent with every request, so /admin/reload is fuzzed too.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.artifact import build_artifact
from bench.servers import SERVICE_STACK, Server, free_port

KEY = "fuzz-key"
SKIPPED_CHECKS = "positive_data_acceptance"


@dataclass(frozen=True)
class FuzzResult:
    returncode: int
    cases: int
    output: str


def fuzz(url: str, max_examples: int, *, seed: int = 0, key: str = KEY) -> FuzzResult:
    """Run schemathesis against `url` (the server's base URL) and count the cases it generated."""
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
        "--checks", "all", "--exclude-checks", SKIPPED_CHECKS,
        "--max-examples", str(max_examples), "--seed", str(seed),
        "--header", f"Authorization: Bearer {key}",
        "--request-timeout", "60", "--no-color",
        # No example database: a run depends on its seed alone, and writes nothing here.
        "--generation-database", "none",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    match = re.search(r"(\d+) generated", output)
    return FuzzResult(proc.returncode, int(match.group(1)) if match else 0, output)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--max-examples", type=int, default=100, help="per operation (default 100)")
    p.add_argument("--min-cases", type=int, default=1000, help="fail below this many cases")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {"VAE_MODEL_PATH": str(build_artifact(work / "vae.pt")), "VAE_API_KEYS": KEY,
               "VAE_LOG_LEVEL": "warning"}  # fmt: skip
        with Server(
            "service", "app.main:create_app", SERVICE_STACK, port=free_port(),
            ready_path="/ready", env=env, log_dir=work,
        ) as server:  # fmt: skip
            result = fuzz(server.url, args.max_examples, seed=args.seed)
            log = (work / "service.log").read_text()
    print(result.output)
    errors = log.count("Traceback")
    print(f"{result.cases} cases generated; schemathesis exit {result.returncode}; "
          f"{errors} tracebacks in the server log")  # fmt: skip
    ok = result.returncode == 0 and result.cases >= args.min_cases and errors == 0
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
