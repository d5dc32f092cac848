"""Load test of the read paths while an evaluation runs: ``make loadtest``.

Starts everything it needs in a temporary folder and stops it at the end:

1. a SQLite database seeded with ``--rows`` finished, public ``digits`` submissions (made-up
   metrics, named "seeded model N": a leaderboard of a realistic size without evaluating them);
2. ``spatialbench serve`` on a free loopback port (the API and a worker, as a user runs it);
3. the three shipped baselines submitted over the REST API, so the worker evaluates the full
   ``digits`` benchmark for the whole measurement (one at a time; each takes about a minute).

Then, once an evaluation runs, it sends GET requests at a fixed rate (an open loop: request i
is due at ``start + i / rate`` whatever the answers, and its latency is counted from when it was
due, so a slow server cannot hide its queue) over ``--connections`` keep-alive connections,
one phase per endpoint and a phase with all three mixed:

- ``GET /api/v1/submissions/{id}`` (with the token, the evaluation being followed),
- ``GET /api/v1/leaderboard/digits``,
- ``GET /leaderboard/digits`` (the HTML page).

It prints, per phase: requests sent, errors, achieved throughput, p50/p90/p99/max latency, and
whether an evaluation was running at the start and at the end of the phase. Every request goes
to 127.0.0.1, to the server this script started; the number of requests is bounded by
``rate * duration`` per phase and the whole run by ``--max-seconds`` (a hard cap: an alarm ends
it and the service is stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the checkout is on the path (the script runs without installing the project).
from api.urls import api_path  # noqa: E402

BENCHMARK = "digits"
BASELINES = ("digits-standard", "digits-augmentation", "digits-worst-of-10")


# --- The service -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(state_dir: Path, rows: int) -> None:
    """``rows`` finished public submissions with made-up metrics, in the state folder's
    database (schema by the migrations, as serve makes it)."""
    from config.settings import Settings
    from db.models import Evaluation, Submission, SubmissionStatus, User
    from db.session import session_scope
    from evaluator.vocabulary import ModelFormat
    from spatialbench.serve import prepare_state

    settings = Settings(_env_file=None, state_dir=state_dir)  # type: ignore[call-arg]
    prepare_state(settings)
    rng = random.Random(0)
    with session_scope(settings) as session:
        owner = User(name="seeded")
        session.add(owner)
        session.flush()
        for n in range(rows):
            natural = rng.uniform(0.9, 0.99)
            grid = natural * rng.uniform(0.0, 0.7)
            submission = Submission(
                owner_id=owner.id, display_name=f"seeded model {n}", benchmark=BENCHMARK,
                model_format=ModelFormat.SAFETENSORS, architecture="small_cnn",
                file_sha256=f"{n:064x}", file_size=1, status=SubmissionStatus.FINISHED,
                progress=1.0, description="Made-up metrics for the load test.",
            )  # fmt: skip
            session.add(submission)
            session.flush()
            session.add(
                Evaluation(
                    submission_id=submission.id,
                    benchmark=BENCHMARK,
                    natural=natural,
                    random=natural * 0.9,
                    worst_of_k=natural * 0.6,
                    grid=grid,
                    vote_natural=natural,
                    grid_vote=grid * 0.5,
                    images=540,
                    # As big as a real digits evaluation's records: the leaderboard must not
                    # pay for them.
                    landscape={"accuracy": [rng.random() for _ in range(775)]},
                    per_image={"grid_fool_count": [rng.randrange(776) for _ in range(540)]},
                )  # fmt: skip
            )


class Service:
    """``spatialbench serve`` in a subprocess, stopped (with its worker) by `stop`."""

    def __init__(self, state_dir: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        self.log = (state_dir.parent / "serve.log").open("wb")
        self.out = state_dir.parent / "serve.out"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPATIALBENCH_")}
        env["PYTHONUNBUFFERED"] = "1"
        with self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from spatialbench.cli import main; main()", "serve",
                 f"--port={port}", f"--state-dir={state_dir}"],
                cwd=ROOT, env=env, stdout=out, stderr=self.log, start_new_session=True,
            )  # fmt: skip

    def token(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited with {self.proc.returncode}; see {self.log.name}")
            for line in self.out.read_text().splitlines():
                if "export TOKEN=" in line:
                    return line.split("=", 1)[1].strip()
            time.sleep(0.2)
        raise SystemExit("serve did not start in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _request(url: str, token: str, data: bytes | None = None, ctype: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    if ctype:
        headers["Content-Type"] = ctype
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as r:
        return json.loads(r.read())


def submit(service: Service, token: str, name: str) -> str:
    """Upload a shipped baseline (multipart, by hand: the standard library has no encoder)."""
    meta = json.loads((ROOT / "baselines" / f"{name}.json").read_text())
    boundary = "loadtest-boundary"
    parts = []
    for key in ("display_name", "architecture", "training_method"):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n'
                     f"{meta[key]}\r\n".encode())  # fmt: skip
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="benchmark"\r\n\r\n'
                 f"{BENCHMARK}\r\n".encode())  # fmt: skip
    weights = (ROOT / "baselines" / f"{name}.safetensors").read_bytes()
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{name}.safetensors"\r\nContent-Type: application/octet-stream'
                 f"\r\n\r\n".encode() + weights + b"\r\n")  # fmt: skip
    parts.append(f"--{boundary}--\r\n".encode())
    answer = _request(service.url + api_path("/submissions"), token, b"".join(parts),
                      f"multipart/form-data; boundary={boundary}")  # fmt: skip
    return str(answer["id"])


def running_id(service: Service, token: str, ids: list[str]) -> str | None:
    for submission_id in ids:
        state = _request(service.url + api_path(f"/submissions/{submission_id}"), token)
        if state["status"] == "running" and state.get("phase"):
            return submission_id
    return None


# --- The load ----------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    paths: list[str]
    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    unsent: int = 0
    wall_s: float = 0.0
    api_cpu_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    running: tuple[bool, bool] = (False, False)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on a keep-alive connection; returns the status (the body is read whole)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (int(v) for k, _, v in (line.partition(":") for line in lines[1:])
         if k.strip().lower() == "content-length"),
        None,
    )  # fmt: skip
    if length is None:
        raise ValueError("no Content-Length")
    await reader.readexactly(length)
    return status


async def run_phase(
    phase: Phase, port: int, token: str, rate: float, duration: float, connections: int
) -> None:
    total = int(rate * duration)
    requests = [
        (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
         "Accept: */*\r\n\r\n").encode()
        for path in phase.paths
    ]  # fmt: skip
    counter = iter(range(total))
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    # A server that falls behind is not waited for: past this, what is left is not sent.
    cutoff = start + 2 * duration + 5

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for i in counter:
                if loop.time() > cutoff:
                    phase.unsent += 1
                    continue
                due = start + i / rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    status = await _get(reader, writer, requests[i % len(requests)])
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    phase.error(type(exc).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                phase.latencies_ms.append((loop.time() - due) * 1000)
                if status != 200:
                    phase.error(f"HTTP {status}")
        finally:
            writer.close()

    began = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    phase.wall_s = time.monotonic() - began - 0.2


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def report(phases: list[Phase], rate: float, connections: int) -> None:
    print(f"\nopen loop at {rate:.0f} req/s over {connections} keep-alive connections; latency "
          "from when each request was due (ms)")  # fmt: skip
    header = (f"{'endpoint':<34} {'sent':>6} {'errors':>6} {'req/s':>7} {'p50':>7} {'p90':>7} "
              f"{'p99':>7} {'max':>7}  evaluation running (start, end)")  # fmt: skip
    print(header)
    print("-" * len(header))
    for p in phases:
        lat = p.latencies_ms
        sent = len(lat) + sum(v for k, v in p.errors.items() if not k.startswith("HTTP"))
        ok = len(lat) - sum(v for k, v in p.errors.items() if k.startswith("HTTP"))
        print(f"{p.name:<34} {sent:>6} {sum(p.errors.values()):>6} {ok / p.wall_s:>7.1f} "
              f"{statistics.median(lat):>7.1f} {percentile(lat, 0.9):>7.1f} "
              f"{percentile(lat, 0.99):>7.1f} {max(lat):>7.1f}  "
              f"{'yes' if p.running[0] else 'NO'}, {'yes' if p.running[1] else 'NO'}")  # fmt: skip
        print(f"{'':<34} API process CPU: {p.api_cpu_s / max(1, len(lat)) * 1000:.2f} ms per "
              f"request; load average {p.load[0]:.1f} -> {p.load[1]:.1f} on {os.cpu_count()} "
              "cores")  # fmt: skip
        if p.errors:
            print(f"{'':<34} errors: {p.errors}")
        if p.unsent:
            print(f"{'':<34} not sent (the phase ran past twice its length): {p.unsent}")


# --- Main --------------------------------------------------------------------------------------


def _alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError("the load test passed its --max-seconds cap")


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit("terminated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rows", type=int, default=60, help="seeded leaderboard entries")
    parser.add_argument("--max-seconds", type=int, default=600, help="hard cap on the run")
    args = parser.parse_args()
    if not 0 < args.rate <= 2000 or not 0 < args.duration <= 120 or args.connections > 200:
        parser.error("rate in (0, 2000], duration in (0, 120], at most 200 connections")
    signal.signal(signal.SIGALRM, _alarm)
    signal.signal(signal.SIGTERM, _terminate)  # so the service is stopped on the way out
    signal.alarm(args.max_seconds)

    folder = Path(tempfile.mkdtemp(prefix="spatialbench-loadtest-"))
    state = folder / "var"
    service: Service | None = None
    try:
        print(f"seeding {args.rows} leaderboard entries in {state}", flush=True)
        seed(state, args.rows)
        service = Service(state, free_port())
        token = service.token()
        print(f"serve is up at {service.url}; submitting the {len(BASELINES)} baselines",
              flush=True)  # fmt: skip
        ids = [submit(service, token, name) for name in BASELINES]
        deadline = time.monotonic() + 120
        followed = None
        while followed is None and time.monotonic() < deadline:
            followed = running_id(service, token, ids)
            time.sleep(0.5)
        if followed is None:
            raise SystemExit("no evaluation started within 120 s; see " + str(service.log.name))
        print(f"evaluation {followed} is running; measuring", flush=True)
        status = api_path(f"/submissions/{followed}")
        board = api_path(f"/leaderboard/{BENCHMARK}")
        phases = [
            Phase(f"GET {status[:22]}...{{id}}", [status]),
            Phase(f"GET {board}", [board]),
            Phase(f"GET /leaderboard/{BENCHMARK}", [f"/leaderboard/{BENCHMARK}"]),
            Phase(
                "all three, mixed",
                [status, board, f"/leaderboard/{BENCHMARK}"],
            ),  # fmt: skip
        ]
        for phase in phases:
            before = running_id(service, token, ids) is not None
            cpu, load = cpu_seconds(service.proc.pid), os.getloadavg()[0]
            # uvloop (uvicorn's own loop) keeps the client's share of the two cores small.
            uvloop.run(run_phase(phase, service.port, token, args.rate, args.duration,
                                 args.connections))  # fmt: skip
            phase.api_cpu_s = cpu_seconds(service.proc.pid) - cpu
            phase.load = (load, os.getloadavg()[0])
            phase.running = (before, running_id(service, token, ids) is not None)
            print(f"  {phase.name}: done", flush=True)
        report(phases, args.rate, args.connections)
    finally:
        signal.alarm(0)
        if service is not None:
            service.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
