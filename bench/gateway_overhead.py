"""Gateway overhead: latency the gateway adds in front of an upstream that answers at once, and requests/s.

Run: .venv/bin/python bench/gateway_overhead.py [--backend worker|replicate] [--requests 2000]
     [--database-url URL] [--compare-litellm] [--floor] [--concurrency 1,32] [--wrap-gateway "py-spy record ... --"]
     [--data-parent DIR] [--durable-floor]

Starts an upstream that answers at once, in its own process, and `uvicorn gateway.app:app_from_env` (one process,
one event loop) in front of it, with a tenant with a monthly budget (so authentication, the budget check, the
prediction record, image storage and the usage event all run). The request is one 1024x1024 image with
``response_format: url``.

- ``--backend worker``: the upstream speaks our worker protocol and answers with a canned 64x64 PNG inline.
- ``--backend replicate``: the fake Replicate (tests/fakes/replicate.py, a real HTTP server) with predictions that
  succeed at once; the gateway creates one, reads it back and downloads the 1024x1024 PNG it names.

A keep-alive HTTP/1.1 client sends the same work straight to the upstream (for replicate: create, get, download)
and through the gateway, at each concurrency, and prints p50/p99/max latency, the difference (what the gateway
adds), requests/s, requests over 1 s, errors (answers other than 200, dropped connections) and the CPU the server's
process spent per request (all its threads, from /proc; with ``--wrap-gateway`` it is the wrapper's). CPU per request
is the steadier figure on a shared machine: requests/s moves with whatever else the cores are doing. For the proxies'
rows it also prints the CPU per request of a PostgreSQL server on this machine ("DB ms", with a local
``--database-url``; every PostgreSQL cluster on the machine counts) and of the whole machine ("box ms": every
process, the load generator and the upstream included): the machine's cores divided by "box ms" bound the requests/s
this machine can carry for that path at all. "box ms" counts whatever else runs meanwhile too: run nothing beside it.

``--floor`` (with ``--backend worker``) also measures bench/floor_proxy.py in front of the same upstream: one uvicorn
process that reads the request, makes the worker call with aiohttp and answers, and does nothing else. It is the
ceiling for any proxy written this way on this machine.

``--durable-floor`` (worker backend) also measures bench/durable_floor.py: the floor plus the gateway's durable work
for one image (the record and settle transactions on the gateway's schema, and the image saved by the gateway's file
store) with no framework: said straight to sqlite3 in a SQLite file of its own, or, with a PostgreSQL
``--database-url``, to the same PostgreSQL database with asyncpg, one round trip per transaction. The gap between it
and the gateway is what a path built only for speed could win; the gap between it and the floor is what the
durability promises themselves cost here.

``--compare-litellm`` also measures a LiteLLM proxy (``litellm`` on PATH; nothing is installed) with one worker in
front of a fake OpenAI images endpoint, with the same client in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from tests.fakes.server import free_port  # noqa: E402

CLI = str(Path(sys.executable).parent / "hidream-gateway")
REPLICATE_MODEL = "prunaai/hidream-l1-fast"
SLOW_S = 1.0


class Client:
    """A minimal keep-alive HTTP/1.1 client, so the load generator costs little CPU next to the servers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        try:
            self.writer.write(head.encode() + b"\r\n" + body)
            status_line = await self.reader.readline()
            length = 0
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            payload = await self.reader.readexactly(length)
            return int(status_line.split()[1]), payload
        except (OSError, asyncio.IncompleteReadError, IndexError, ValueError):
            self.writer.close()
            self.writer = self.reader = None  # reconnect on the next request
            return 0, b""


# One unit of work: returns (status, body) of its last request, or of the first one that was not 200.
Work = Callable[[Client], Awaitable[tuple[int, bytes]]]


def post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Work:
    data = json.dumps(body).encode()

    async def work(client: Client) -> tuple[int, bytes]:
        return await client.request("POST", path, data, headers)

    return work


def replicate_direct(token: str) -> Work:
    """Straight to the fake Replicate: what the gateway does per image (create, get, download)."""
    auth = {"Authorization": f"Bearer {token}"}
    data = {"prompt": "a fox", "model_type": "fast", "resolution": "1024 × 1024 (Square)", "seed": 1}
    create = json.dumps({"input": data | {"output_format": "png", "output_quality": 90}}).encode()

    async def work(client: Client) -> tuple[int, bytes]:
        status, body = await client.request("POST", f"/v1/models/{REPLICATE_MODEL}/predictions", create, auth)
        if status != 201:
            return status, body
        pid = json.loads(body)["id"]
        status, body = await client.request("GET", f"/v1/predictions/{pid}", headers=auth)
        if status != 200:
            return status, body
        output = json.loads(body)["output"]
        return await client.request("GET", "/" + output.split("/", 3)[3])

    return work


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    wall: float = 0.0
    first_error: str = ""


async def load(port: int, work: Work, total: int, concurrency: int) -> Result:
    result = Result()
    remaining = total

    async def one_client() -> None:
        nonlocal remaining
        client = Client(port)
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status, body = await work(client)
            result.latencies.append(time.perf_counter() - t0)
            if status != 200:
                result.errors += 1
                result.first_error = result.first_error or f"{status} {body[:300]!r}"
        if client.writer is not None:
            client.writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    result.wall = time.perf_counter() - start
    return result


def cpu_seconds(pid: int, *, reaped: bool = False) -> float | None:
    """User plus system CPU seconds a process (all its threads) has used so far; None where /proc is absent. With
    ``reaped``, its children's too, those that have ended and been waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> float | None:
    """CPU seconds every core of the machine has been busy so far (all processes: the load generator, the upstream,
    the database server, the proxy); None where /proc is absent.
    """
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(f) for f in fields]
    # user, nice, system, irq, softirq: not idle, iowait, nor steal (time the hypervisor gave to another machine).
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def postgres_cpu() -> dict[int, float]:
    """CPU seconds used so far by each of this machine's PostgreSQL server processes, by pid; the postmaster's
    includes the backends it has reaped (a connection closed, e.g. a pool's overflow given back)."""
    used: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        seconds = cpu_seconds(int(entry.name), reaped=True)
        if seconds is not None:
            used[int(entry.name)] = seconds
    return used


def postgres_spent(before: dict[int, float], after: dict[int, float]) -> float | None:
    """CPU seconds PostgreSQL's processes spent between two readings. A backend that ended meanwhile is counted in
    the postmaster's reaped children, whole: what it had spent by the first reading is taken off again. (A backend
    that ended but was not yet reaped at the second reading is missed.)
    """
    if not after:
        return None
    grown = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    return grown - sum(seconds for pid, seconds in before.items() if pid not in after)


@dataclass
class Cpu:
    """CPU milliseconds per request during one row: the proxy's process, the database server's, the machine's."""

    proxy: float | None
    database: float | None
    machine: float | None


def _per(before: float | None, after: float | None, requests: int) -> float | None:
    return (after - before) * 1000 / requests if before is not None and after is not None else None


def measured(pid: int, port: int, work: Work, total: int, concurrency: int, *, pg: bool = False) -> tuple[Result, Cpu]:
    """``load``, and the CPU milliseconds spent per request meanwhile by the server process ``pid``, by a local
    PostgreSQL (``pg``) and by the machine.
    """
    before = cpu_seconds(pid), postgres_cpu() if pg else {}, machine_cpu_seconds()
    result = asyncio.run(load(port, work, total, concurrency))
    after = cpu_seconds(pid), postgres_cpu() if pg else {}, machine_cpu_seconds()
    n = len(result.latencies)
    database = postgres_spent(before[1], after[1])
    return result, Cpu(
        _per(before[0], after[0], n),
        database * 1000 / n if database is not None else None,
        _per(before[2], after[2], n),
    )


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def _ms(value: float | None) -> str:
    return f" {value:8.2f}" if value is not None else f" {'-':>8}"


def row(conc: int, name: str, r: Result, cpu: Cpu | None = None) -> Result:
    slow = sum(1 for t in r.latencies if t > SLOW_S)
    print(
        f"{conc:>11}  {name:<10} {pct(r.latencies, 50):8.2f} {pct(r.latencies, 99):8.2f} "
        f"{max(r.latencies) * 1000:8.1f} {len(r.latencies) / r.wall:7.0f} {slow:>6} {r.errors:>6}"
        + (_ms(cpu.proxy) + _ms(cpu.database) + _ms(cpu.machine) if cpu is not None else ""),
        flush=True,
    )
    if r.first_error:
        print(f"             ({name}: first error: {r.first_error})", file=sys.stderr)
    return r


def added(conc: int, name: str, through: Result, direct: Result) -> None:
    a50 = pct(through.latencies, 50) - pct(direct.latencies, 50)
    a99 = pct(through.latencies, 99) - pct(direct.latencies, 99)
    print(f"{conc:>11}  {name:<10} {a50:8.2f} {a99:8.2f}", flush=True)


# --- upstreams, each served from a child process so it does not share a GIL with the load generator ---


def _serve_upstream(kind: str, conn: Any) -> None:
    """Child process: serve one fake upstream and send its (port, token) back; runs until terminated."""
    sys.path.insert(0, str(ROOT))
    from tests.fakes.server import ServerThread

    token = ""
    if kind == "worker":
        from tests.fakes.worker import instant_worker_app

        server = ServerThread(instant_worker_app()).start()
    elif kind == "replicate":
        server, token = _instant_replicate()
    else:
        server = ServerThread(_openai_images_app()).start()
    conn.send((server.port, token))
    signal.sigwait({signal.SIGTERM})


def _instant_replicate() -> tuple[Any, str]:
    """The fake Replicate answering at once, every output the same pre-encoded image (the fake encodes one per
    prediction otherwise, which would make the fake, not the gateway, the bottleneck)."""
    from tests.fakes.replicate import FakeReplicate, _Plan
    from tests.fakes.server import make_image

    images: dict[tuple[tuple[int, int], str], bytes] = {}

    class InstantReplicate(FakeReplicate):
        def _end(self, prediction: dict[str, Any], plan: _Plan, status: str, at: float) -> None:
            if (plan.size, plan.fmt) not in images:
                images[plan.size, plan.fmt] = make_image(*plan.size, plan.fmt)
            plan.image = images[plan.size, plan.fmt]
            super()._end(prediction, plan, status, at)

    fake = InstantReplicate()
    fake.faults.processing_s = 0.0  # succeeded by the time anyone reads it
    fake.start()
    return fake.server, fake.token


def _openai_images_app() -> Any:
    """OpenAI's ``POST /v1/images/generations`` answering at once with one image URL (LiteLLM's upstream)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        url = f"http://127.0.0.1:{request.url.port}/files/{time.time_ns()}.png"
        return JSONResponse({"created": int(time.time()), "data": [{"url": url}] * int(body.get("n", 1))})

    return Starlette(routes=[Route("/v1/images/generations", generate, methods=["POST"])])


class Upstream:
    def __init__(self, kind: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve_upstream, args=(kind, child), daemon=True)
        self.proc.start()
        if not parent.poll(60):
            raise SystemExit(f"the {kind} upstream did not start")
        self.port, self.token = parent.recv()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.join(10)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT: uvicorn shuts down cleanly on it, and a wrapping profiler writes its output."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_litellm(tmp: str) -> tuple[subprocess.Popen[bytes], Upstream, int, str] | None:
    exe = shutil.which("litellm")
    if exe is None:
        print("litellm: skipped (no `litellm` executable on PATH; nothing is installed)", flush=True)
        return None
    upstream = Upstream("openai")
    key = "sk-bench-master-key"
    config = Path(tmp) / "litellm.yaml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "model_list": [
                    {
                        "model_name": "hidream-i1-fast",
                        "litellm_params": {
                            "model": "openai/hidream-i1-fast",
                            "api_base": f"http://127.0.0.1:{upstream.port}/v1",
                            "api_key": "sk-upstream",
                        },
                    }
                ],
                "general_settings": {"master_key": key},
                # OpenAI's own image models reject some parameters; this model name is not one of them.
                "litellm_settings": {"drop_params": True},
            }
        )
    )
    port = free_port()
    command = [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, "litellm", timeout=180)
    return proc, upstream, port, key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("worker", "replicate"), default="worker")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary data dir")
    parser.add_argument("--concurrency", default="1,32", help="comma-separated client counts (default 1,32)")
    parser.add_argument("--compare-litellm", action="store_true", help="also measure a LiteLLM proxy on PATH")
    parser.add_argument("--floor", action="store_true", help="also measure bench/floor_proxy.py (worker backend)")
    parser.add_argument(
        "--durable-floor",
        action="store_true",
        help="also measure bench/durable_floor.py: the floor plus the gateway's durable work, straight to the driver",
    )
    parser.add_argument(
        "--durable-floor-files",
        choices=("store", "none"),
        default="store",
        help="store: the durable floor saves each image with the gateway's file store; none: it stores no image (a "
        "bound: what the floor would cost if storing an image cost nothing)",
    )
    parser.add_argument(
        "--wrap-gateway", default="", help='a command prefix for the gateway, e.g. "py-spy record -o p.txt --"'
    )
    parser.add_argument(
        "--data-parent",
        default=None,
        help="where the gateway's throwaway data dir (SQLite, image files) is made (default: the system's temp dir); "
        "each image is a new file, whose cost depends on the filesystem under it",
    )
    args = parser.parse_args()
    if (args.floor or args.durable_floor) and args.backend != "worker":
        parser.error("the floors make the worker call: use them with --backend worker")
    if args.durable_floor_files != "store" and not args.durable_floor:
        parser.error("--durable-floor-files is for --durable-floor")
    levels = [int(c) for c in args.concurrency.split(",")]

    upstream = Upstream(args.backend)
    gateway: subprocess.Popen[bytes] | None = None
    litellm = None
    floor: subprocess.Popen[bytes] | None = None
    durable: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(dir=args.data_parent) as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HDG_")} | {
            "HDG_DATA_DIR": tmp,
            "HDG_BACKENDS": args.backend,
        }
        env.pop("REPLICATE_API_TOKEN", None)
        up = f"http://127.0.0.1:{upstream.port}"
        if args.backend == "worker":
            env |= {"HDG_WORKER_URLS": up, "HDG_WORKER_MAX_IN_FLIGHT": "1000"}
            direct: Work = post("/generate", {"variant": "fast", "prompt": "a fox", "width": 1024, "height": 1024})
        else:
            env |= {
                "HDG_REPLICATE_API_TOKEN": upstream.token,
                "HDG_REPLICATE_BASE_URL": up,
                "HDG_REPLICATE_OUTPUT_HOSTS": up,
                "HDG_PROVIDER_MAX_IN_FLIGHT": "1000",
                "HDG_PROVIDER_POLL_SECONDS": "0.05",
            }
            direct = replicate_direct(upstream.token)
        if args.database_url:
            env["HDG_DATABASE_URL"] = args.database_url
        # The database server's CPU is counted only where it runs on this machine.
        pg = bool(args.database_url) and args.database_url.startswith("postgresql") and _local(args.database_url)
        made = subprocess.run(
            [CLI, "tenants", "create", "bench", "--monthly-budget-usd", "1000000"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        auth = {"Authorization": f"Bearer {json.loads(made.stdout)['api_key']}"}
        request = {"model": "hidream-i1-fast", "prompt": "a fox", "size": "1024x1024", "response_format": "url"}
        through = post("/v1/images/generations", request, auth)
        gw_port = free_port()
        command = [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:app_from_env", "--port", str(gw_port)]
        command += ["--log-level", "warning", "--no-access-log"]
        try:
            gateway = subprocess.Popen(shlex.split(args.wrap_gateway) + command, env=env, cwd=ROOT)
            wait_for_port(gw_port, gateway, "the gateway")
            if args.compare_litellm:
                litellm = start_litellm(tmp)
            to_floor = post("/v1/images/generations", request)
            if args.floor:
                floor, floor_port = serve_floor("floor_proxy", env | {"HDG_FLOOR_UPSTREAM": up}, to_floor)
            durable_key = f"hdg_floor_{secrets.token_urlsafe(24)}"  # on a shared database too: nobody's known key
            to_durable = post("/v1/images/generations", request, _bearer(durable_key))
            if args.durable_floor:
                data = {"HDG_FLOOR_DATA": os.path.join(tmp, "durable-floor"), "HDG_FLOOR_KEY": durable_key}
                data["HDG_FLOOR_FILES"] = args.durable_floor_files
                if args.database_url and args.database_url.startswith("postgresql"):
                    data["HDG_FLOOR_DATABASE_URL"] = args.database_url  # the same database, a tenant of its own
                durable_env = env | {"HDG_FLOOR_UPSTREAM": up} | data
                durable, durable_port = serve_floor("durable_floor", durable_env, to_durable)
            warm = asyncio.run(load(gw_port, through, 200, 4))
            if warm.errors:
                raise SystemExit(f"the gateway failed during warm-up: {warm.first_error}")
            if litellm is not None:
                asyncio.run(load(litellm[2], post("/v1/images/generations", request, _bearer(litellm[3])), 200, 4))
            print(
                f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
                f"backend: {args.backend}; database: {_redacted(args.database_url) or 'SQLite'}; "
                f"{args.requests} requests per row; data dir under {Path(tmp).parent}"
                + ("; the durable floor stores no image" if durable and args.durable_floor_files == "none" else "")
            )
            print("concurrency  path         p50 ms   p99 ms   max ms   req/s   >1 s errors   CPU ms    DB ms   box ms")
            for conc in levels:
                d = row(conc, "upstream", asyncio.run(load(upstream.port, direct, args.requests, conc)))
                g = row(conc, "gateway", *measured(gateway.pid, gw_port, through, args.requests, conc, pg=pg))
                added(conc, "added", g, d)
                if floor is not None:
                    f = row(conc, "floor", *measured(floor.pid, floor_port, to_floor, args.requests, conc))
                    added(conc, "fl-added", f, d)
                if durable is not None:
                    measure = measured(durable.pid, durable_port, to_durable, args.requests, conc, pg=pg)
                    d_row = row(conc, "durable", *measure)
                    added(conc, "du-added", d_row, d)
                if litellm is not None:
                    to_openai = post("/v1/images/generations", request, _bearer("sk-upstream"))
                    to_litellm = post("/v1/images/generations", request, _bearer(litellm[3]))
                    ld = row(conc, "openai-up", asyncio.run(load(litellm[1].port, to_openai, args.requests, conc)))
                    lg = row(conc, "litellm", *measured(litellm[0].pid, litellm[2], to_litellm, args.requests, conc))
                    added(conc, "ll-added", lg, ld)
        finally:
            if gateway is not None:
                stop(gateway)
            if litellm is not None:
                stop(litellm[0])
                litellm[1].stop()
            if floor is not None:
                stop(floor)
            if durable is not None:
                stop(durable)
            upstream.stop()


def serve_floor(module: str, env: dict[str, str], work: Work) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``bench/<module>.py``'s app under uvicorn and warm it up; its process and port."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", f"bench.{module}:app", "--port", str(port), "--log-level", "warning"]
    command += ["--lifespan", "on"]  # a start-up that fails says why, and stops the process
    proc = subprocess.Popen(command, env=env, cwd=ROOT)
    wait_for_port(port, proc, module)
    warmed = asyncio.run(load(port, work, 200, 4))
    if warmed.errors:
        stop(proc)
        raise SystemExit(f"{module} failed during warm-up: {warmed.first_error}")
    return proc, port


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _local(url: str) -> bool:
    """Whether a database URL names this machine (a host given in the query string counts as another)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    return "host" not in parsed.query and parsed.host in (None, "", "127.0.0.1", "localhost", "::1")


def _redacted(url: str | None) -> str | None:
    """A database URL without its password, for the header line."""
    if url is None or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    return f"{scheme}://{creds.split(':', 1)[0]}@{host}"


if __name__ == "__main__":
    main()
