"""The ``spatialbench`` commands that talk to a server: submit, status, cancel, leaderboard.

The server URL and token come from options, then the environment (``SPATIALBENCH_URL``,
``SPATIALBENCH_TOKEN``), then ``~/.config/spatialbench/config.toml`` (``url = ...``,
``token = ...``). Errors from the server are shown as their message, never as a traceback.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from api.urls import api_path, submission_path
from evaluator.vocabulary import (
    BOARD_METRICS,
    METRIC_KEYS,
    BenchmarkCounts,
    MetricKey,
    metric_texts,
)

app = typer.Typer(no_args_is_help=True)
console = Console(stderr=True)
out = Console()

DEFAULT_URL = "http://127.0.0.1:8000"
CONFIG_PATH = Path("~/.config/spatialbench/config.toml")
FINAL = {"finished", "failed", "cancelled"}


def metric_labels(
    keys: tuple[MetricKey, ...], counts: BenchmarkCounts | None
) -> list[tuple[str, str]]:
    """(result key, short label) of each of ``keys``, worded for the benchmark's ``counts``
    ("worst-of-4" on a benchmark with k = 4; "worst-of-k" when they are unknown)."""
    texts = metric_texts(counts)
    return [(key.value, texts[key].short) for key in keys]


class ClientError(Exception):
    """A problem to show the user as one line."""


@dataclass(frozen=True)
class Connection:
    url: str
    token: str | None

    def client(self, timeout: float = 60.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url.rstrip("/"), headers=headers, timeout=timeout)


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = (path or Path(os.environ.get("SPATIALBENCH_CONFIG", CONFIG_PATH))).expanduser()
    if not path.exists():
        return {}
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def connection(url: str | None, token: str | None) -> Connection:
    config = read_config()
    return Connection(
        url=url or os.environ.get("SPATIALBENCH_URL") or config.get("url") or DEFAULT_URL,
        token=token or os.environ.get("SPATIALBENCH_TOKEN") or config.get("token"),
    )


def check(response: httpx.Response) -> Any:
    """The JSON body of a successful response; the server's own message otherwise."""
    if response.is_success:
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text
    try:
        body = response.json()
        message = body.get("detail") or body.get("error") or response.text
        if body.get("error") and body.get("detail") and body["error"] not in str(body["detail"]):
            message = f"{body['error']}: {body['detail']}"
    except (ValueError, AttributeError):
        message = response.text or response.reason_phrase
    if isinstance(message, list | dict):
        message = json.dumps(message)
    retry = response.headers.get("retry-after")
    hint = f" (retry after {retry} s)" if retry else ""
    raise ClientError(f"{response.status_code}: {message}{hint}")


class _ProgressReader:
    """A file wrapper that advances a progress bar as httpx reads the upload."""

    def __init__(self, fh: BinaryIO, advance: Any) -> None:
        self.fh, self.advance = fh, advance

    def read(self, size: int = -1) -> bytes:
        data = self.fh.read(size)
        self.advance(len(data))
        return data

    def __iter__(self) -> Iterator[bytes]:
        while chunk := self.read(1 << 16):
            yield chunk


def submit_model(
    conn: Connection,
    path: Path,
    fields: dict[str, str],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Upload ``path`` with its metadata fields; the server's answer (id, status URL...)."""
    size = path.stat().st_size
    with (
        conn.client(timeout=600.0) as client,
        open(path, "rb") as fh,
        Progress(
            TextColumn("upload"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not show_progress,
        ) as bar,
    ):
        task = bar.add_task("upload", total=size)
        reader = _ProgressReader(fh, lambda n: bar.advance(task, n))
        files = {"file": (path.name, reader, "application/octet-stream")}
        return check(client.post(api_path("/submissions"), data=fields, files=files))  # type: ignore[arg-type]


def get_status(conn: Connection, submission_id: str) -> dict[str, Any]:
    with conn.client() as client:
        return check(client.get(submission_path(submission_id)))


def wait_for(conn: Connection, submission_id: str, poll_s: float = 2.0) -> dict[str, Any]:
    """Follow a submission with a progress bar until it ends; its final state."""
    with Progress(
        TextColumn("{task.fields[phase]:<11}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TextColumn("{task.fields[passes]:>14} passes"),
        TextColumn("ETA {task.fields[eta]}"),
        console=console,
    ) as bar:
        task = bar.add_task("wait", total=1.0, phase="queued", passes="0", eta="-")
        while True:
            state = get_status(conn, submission_id)
            eta = state.get("eta_seconds")
            bar.update(
                task,
                completed=float(state.get("progress") or 0.0),
                phase=state.get("phase") or state["status"],
                passes=f"{int(state.get('forward_passes') or 0):,}",
                eta="-" if eta is None else f"{eta:.0f} s",
            )
            if state["status"] in FINAL:
                return state
            time.sleep(poll_s)


def metrics_of(state: dict[str, Any]) -> dict[str, Any]:
    evaluation = state.get("evaluation") or {}
    return state.get("metrics") or evaluation.get("metrics") or {}


def _accuracy(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("accuracy")
    return "-" if value is None else f"{100 * float(value):.2f}%"


def print_state(state: dict[str, Any]) -> None:
    table = Table(title=f"{state.get('display_name', '')} ({state['id']})", show_header=False)
    table.add_row("status", state["status"])
    if state.get("phase"):
        table.add_row("phase", f"{state['phase']} ({100 * float(state.get('progress') or 0):.1f}%)")
    table.add_row("forward passes", f"{int(state.get('forward_passes') or 0):,}")
    if state.get("message"):
        table.add_row("message", state["message"])
    metrics = metrics_of(state)
    evaluation = state.get("evaluation") or {}
    details = evaluation.get("details") or {}
    # The numbers in the labels are those this evaluation ran with.
    counts = BenchmarkCounts.of(evaluation.get("config"))
    for key, label in metric_labels(METRIC_KEYS, counts):
        if metrics.get(key) is not None:
            table.add_row(label, _accuracy(metrics[key]) + _images(details.get(key)))
    out.print(table)


def _images(detail: Any) -> str:
    """ " (50 images)": the images behind a number, which a subset metric does not share with
    the run."""
    images = detail.get("images", detail.get("total")) if isinstance(detail, dict) else None
    return f" ({images:,} images)" if isinstance(images, int) and images else ""


def _fail(exc: Exception) -> typer.Exit:
    if isinstance(exc, httpx.TransportError):
        console.print(f"[red]error:[/red] cannot reach the server ({exc})")
    else:
        console.print(f"[red]error:[/red] {exc}")
    return typer.Exit(1)


UrlOption = Annotated[str | None, typer.Option("--url", help="server [env SPATIALBENCH_URL]")]
TokenOption = Annotated[
    str | None, typer.Option("--token", help="API token [env SPATIALBENCH_TOKEN]")
]


@app.command()
def submit(
    model: Annotated[Path, typer.Argument(help="safetensors weights or a .pt2 archive")],
    benchmark: Annotated[str | None, typer.Option(help="benchmark, e.g. cifar10")] = None,
    arch: Annotated[str | None, typer.Option(help="registry architecture (safetensors)")] = None,
    name: Annotated[str | None, typer.Option(help="display name [file name]")] = None,
    method: Annotated[
        str | None, typer.Option(help="training method: standard, augmentation, worst-of-k, other")
    ] = None,
    mean: Annotated[str | None, typer.Option(help="per-channel mean, e.g. 0.49,0.48,0.45")] = None,
    std: Annotated[str | None, typer.Option(help="per-channel std")] = None,
    extra_data: Annotated[bool, typer.Option(help="trained with extra data")] = False,
    paper_url: Annotated[str | None, typer.Option(help="link to the paper")] = None,
    description: Annotated[str | None, typer.Option(help="a sentence or two")] = None,
    private: Annotated[bool, typer.Option(help="only you can see it")] = False,
    metadata: Annotated[
        Path | None, typer.Option(help="JSON metadata (as `spatialbench train` writes)")
    ] = None,
    wait: Annotated[bool, typer.Option(help="follow the evaluation until it ends")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Upload a model for evaluation; prints its id and status URL."""
    conn = connection(url, token)
    fields: dict[str, Any] = {}
    meta_path = metadata or (
        model.with_suffix(".json") if model.with_suffix(".json").exists() else None
    )
    if meta_path is not None:
        fields.update(json.loads(meta_path.read_text()))
    given = {
        "benchmark": benchmark,
        "architecture": arch,
        "display_name": name,
        "training_method": method,
        "mean": mean,
        "std": std,
        "paper_url": paper_url,
        "description": description,
    }
    fields.update({k: v for k, v in given.items() if v is not None})
    fields.setdefault("display_name", model.stem)
    if extra_data:
        fields["extra_data"] = True
    if private:
        fields["is_public"] = False
    if "benchmark" not in fields:
        console.print("[red]error:[/red] give --benchmark (or a metadata file that names it)")
        raise typer.Exit(2)
    form = {
        k: (
            json.dumps(v)
            if isinstance(v, list)
            else str(v).lower()
            if isinstance(v, bool)
            else str(v)
        )
        for k, v in fields.items()
        if v is not None and k in SUBMIT_FIELDS
    }
    try:
        answer = submit_model(conn, model, form)
        verb = "already submitted as" if answer.get("duplicate") else "submitted"
        out.print(f"{verb} {answer['id']}  status: {answer.get('status')}")
        status_url = answer.get("status_url") or conn.url + submission_path(answer["id"])
        out.print(f"follow it: curl {status_url}")
        if wait:
            state = wait_for(conn, answer["id"])
            print_state(state)
            if state["status"] != "finished":
                raise typer.Exit(1)
    except (ClientError, httpx.HTTPError) as exc:
        raise _fail(exc) from None


SUBMIT_FIELDS = {
    "display_name", "benchmark", "architecture", "mean", "std", "training_method", "extra_data",
    "paper_url", "description", "is_public",
}  # fmt: skip


@app.command()
def status(
    submission_id: Annotated[str, typer.Argument(help="submission id")],
    wait: Annotated[bool, typer.Option(help="follow it until it ends")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show a submission's status, progress and, when finished, its metrics."""
    conn = connection(url, token)
    try:
        state = wait_for(conn, submission_id) if wait else get_status(conn, submission_id)
    except (ClientError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    if as_json:
        out.print_json(data=state)
    else:
        print_state(state)


@app.command()
def cancel(
    submission_id: Annotated[str, typer.Argument(help="submission id")],
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Cancel one of your submissions (queued or running)."""
    conn = connection(url, token)
    try:
        with conn.client() as client:
            state = check(client.post(submission_path(submission_id) + "/cancel"))
    except (ClientError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    out.print(f"{submission_id}: {state.get('status')}")


def leaderboard_table(
    body: dict[str, Any], benchmark: str, sort: str, counts: BenchmarkCounts | None
) -> Table:
    """The leaderboard's JSON as a table, one column per metric of the board
    (`BOARD_METRICS`), named with the benchmark's ``counts``."""
    metrics = metric_labels(BOARD_METRICS, counts)
    table = Table(title=f"{benchmark} leaderboard (sorted by {sort})")
    for column in ("#", "model", "arch", "method", *(label for _, label in metrics)):
        table.add_column(
            column, justify="right" if column not in ("model", "arch", "method") else "left"
        )
    for row in body.get("rows", []):
        m = row.get("metrics") or row
        table.add_row(
            str(row.get("rank", "")),
            str(row.get("display_name", "")),
            str(row.get("architecture") or ""),
            str(row.get("training_method") or ""),
            *(_accuracy(m.get(key)) for key, _ in metrics),
        )
    return table


@app.command()
def leaderboard(
    benchmark: Annotated[str, typer.Argument(help="benchmark name")],
    sort: Annotated[str, typer.Option(help="column to sort by")] = "grid",
    csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Print a benchmark's leaderboard."""
    conn = connection(url, token)
    params = {"sort": sort, **({"format": "csv"} if csv else {})}
    try:
        with conn.client() as client:
            body = check(client.get(api_path(f"/leaderboard/{benchmark}"), params=params))
            if csv:
                typer.echo(body, nl=False)
                return
            benchmarks = check(client.get(api_path("/benchmarks")))
    except (ClientError, httpx.HTTPError) as exc:
        raise _fail(exc) from None
    record = next((b for b in benchmarks if b.get("name") == benchmark), None)
    table = leaderboard_table(body, benchmark, sort, BenchmarkCounts.of(record))
    # Eleven columns: wider than the 80 a pipe gets by default, so nothing is cut there.
    (out if out.is_terminal else Console(width=180)).print(table)
