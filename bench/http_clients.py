"""The HTTP client the backends use: CPU and wall time per call, httpx's own transport against aiohttp's.

Run: .venv/bin/python bench/http_clients.py [--calls 3000] [--concurrency 1,32]

Starts the worker upstream that answers at once (the same one bench/gateway_overhead.py uses, in its own process)
and sends the worker's ``POST /generate`` (a small JSON body; the answer is a 64x64 PNG, base64 in JSON) with:

- ``httpx``: httpx.AsyncClient with its own transport (httpcore), as the gateway did before;
- ``httpx+aiohttp``: httpx.AsyncClient over gateway.backends.transport.AiohttpTransport (httpx's client layer, then
  aiohttp), as the gateway's downloads go;
- ``gateway``: gateway.backends.transport.AiohttpClient, whose plain calls skip httpx's client layer, as the gateway's
  API calls to backends go;
- ``aiohttp``: aiohttp alone, for the floor.

Each reads the JSON answer. It prints, per client and concurrency, the wall time per call and this process's CPU
time per call (the load is this process, so CPU per call is what the gateway's event loop would spend on it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from bench.gateway_overhead import Upstream  # noqa: E402
from gateway.backends.transport import AiohttpClient, AiohttpTransport  # noqa: E402

BODY = {"variant": "fast", "prompt": "a fox", "width": 1024, "height": 1024}


async def measure(call: Callable[[], Awaitable[None]], calls: int, concurrency: int) -> tuple[float, float]:
    """(wall µs per call, CPU µs per call) for ``calls`` calls, ``concurrency`` at a time."""
    for _ in range(50):  # connections opened, code paths warm
        await call()
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            await call()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one() for _ in range(calls)))
    return 1e6 * (time.perf_counter() - wall) / calls, 1e6 * (time.process_time() - cpu) / calls


async def run(port: int, calls: int, levels: list[int]) -> None:
    url = f"http://127.0.0.1:{port}/generate"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {calls} calls")
    print("client          concurrency  wall us/call  cpu us/call")
    for name in ("httpx", "httpx+aiohttp", "gateway", "aiohttp"):
        for conc in levels:
            if name == "aiohttp":
                async with aiohttp.ClientSession() as session:

                    async def bare(session: aiohttp.ClientSession = session) -> None:
                        async with session.post(url, json=BODY) as resp:
                            await resp.json()

                    wall, cpu = await measure(bare, calls, conc)
            elif name == "gateway":
                async with AiohttpClient(timeout=httpx.Timeout(30.0, connect=5.0)) as ours:

                    async def short(client: AiohttpClient = ours) -> None:
                        (await client.request("POST", url, json=BODY)).json()

                    wall, cpu = await measure(short, calls, conc)
            else:
                transport = AiohttpTransport() if name == "httpx+aiohttp" else None
                limits = httpx.Limits(max_connections=256)
                async with httpx.AsyncClient(transport=transport, limits=limits) as client:

                    async def through(client: httpx.AsyncClient = client) -> None:
                        (await client.post(url, json=BODY)).json()

                    wall, cpu = await measure(through, calls, conc)
            print(f"{name:<15} {conc:>11}  {wall:12.0f}  {cpu:11.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", default="1,32", help="comma-separated calls in flight (default 1,32)")
    args = parser.parse_args()
    upstream = Upstream("worker")
    try:
        uvloop.run(run(upstream.port, args.calls, [int(c) for c in args.concurrency.split(",")]))
    finally:
        upstream.stop()


if __name__ == "__main__":
    main()
