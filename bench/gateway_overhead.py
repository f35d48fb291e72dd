"""Gateway overhead: latency the gateway adds in front of an upstream that answers at once, and requests/s.

Run: .venv/bin/python bench/gateway_overhead.py [--requests 2000] [--database-url URL]

Starts an instant upstream that speaks the worker protocol (a canned 64x64 PNG), and `hidream-gateway
serve` (one process, one event loop) with the worker backend pointed at it, a tenant with a monthly budget
(so authentication, the budget check, the prediction record, image storage and the usage event all run).
A keep-alive HTTP/1.1 client sends the same request straight to the upstream and through the gateway,
at concurrency 1 and 32, and prints p50/p99 latency of each, the difference (what the gateway adds),
and the gateway's requests per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from tests.fakes.server import free_port
from tests.fakes.worker import instant_worker_app

CLI = str(Path(sys.executable).parent / "hidream-gateway")


class Client:
    """A minimal keep-alive HTTP/1.1 client, so the load generator costs little CPU next to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await self.reader.readexactly(length)
        return int(status_line.split()[1])


async def load(
    port: int, path: str, body: bytes, headers: dict[str, str], total: int, concurrency: int
) -> tuple[list[float], float]:
    latencies: list[float] = []
    remaining = total

    async def one_client() -> None:
        nonlocal remaining
        client = Client(port)
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            status = await client.post(path, body, headers)
            latencies.append(time.perf_counter() - t0)
            if status != 200:
                raise SystemExit(f"{path} answered {status}")

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary data dir")
    args = parser.parse_args()

    up_port = free_port()
    upstream = uvicorn.Server(uvicorn.Config(instant_worker_app(), port=up_port, log_level="warning", access_log=False))
    threading.Thread(target=upstream.run, daemon=True).start()

    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HDG_")} | {
            "HDG_DATA_DIR": tmp,
            "HDG_BACKENDS": "worker",
            "HDG_WORKER_URLS": f"http://127.0.0.1:{up_port}",
            "HDG_WORKER_MAX_IN_FLIGHT": "1000",
        }
        if args.database_url:
            env["HDG_DATABASE_URL"] = args.database_url
        made = subprocess.run(
            [CLI, "tenants", "create", "bench", "--monthly-budget-usd", "1000000"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        key = json.loads(made.stdout)["api_key"]
        gw_port = free_port()
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                "gateway.app:app_from_env",
                "--port",
                str(gw_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=env,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", gw_port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or gateway.poll() is not None:
                        raise SystemExit("gateway did not start") from None
                    time.sleep(0.1)
            body = json.dumps({"model": "hidream-i1-fast", "prompt": "a fox", "size": "1024x1024"}).encode()
            worker_body = json.dumps(
                {"variant": "fast", "prompt": "a fox", "width": 1024, "height": 1024, "seed": 1}
            ).encode()
            auth = {"Authorization": f"Bearer {key}"}
            asyncio.run(load(gw_port, "/v1/images/generations", body, auth, 200, 4))  # warm-up
            print(f"machine: {platform.machine()}, {os.cpu_count()} cores; database: {args.database_url or 'SQLite'}")
            print("concurrency  path      p50 ms   p99 ms   req/s")
            for conc in (1, 32):
                direct, d_wall = asyncio.run(load(up_port, "/generate", worker_body, {}, args.requests, conc))
                through, g_wall = asyncio.run(load(gw_port, "/v1/images/generations", body, auth, args.requests, conc))
                print(f"{conc:>11}  upstream {pct(direct, 50):8.2f} {pct(direct, 99):8.2f} {len(direct) / d_wall:7.0f}")
                print(
                    f"{conc:>11}  gateway  {pct(through, 50):8.2f} {pct(through, 99):8.2f} {len(through) / g_wall:7.0f}"
                )
                added50, added99 = pct(through, 50) - pct(direct, 50), pct(through, 99) - pct(direct, 99)
                print(f"{conc:>11}  added    {added50:8.2f} {added99:8.2f}")
        finally:
            gateway.terminate()
            gateway.wait()
            upstream.should_exit = True


if __name__ == "__main__":
    main()
