"""Routing simulation: replay requests through the gateway while backends go down, throttle and change price.

Run: .venv/bin/python bench/routing_sim.py [--per-phase 500] [--concurrency 8]

Backends: an instant worker (our GPU, priced by GPU seconds), a fake Replicate and a fake fal (real HTTP
servers from tests/fakes). Each phase scripts outages and price changes; an oracle that always knows
which backends are live and what they cost picks the cheapest for every request. Prints, per phase and in
total, the share of requests served and the gateway's mean cost against the oracle's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from gateway.app import create_app
from gateway.settings import Settings
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import ServerThread
from tests.fakes.worker import instant_worker_app

ADMIN = "sim-admin"
GPU_RATE = Decimal("0.001097")
MP = Decimal(1024 * 1024) / Decimal(1_000_000)


@dataclass
class Phase:
    name: str
    down: set[str] = field(default_factory=set)  # stopped servers
    throttled: set[str] = field(default_factory=set)  # answering 429
    costs: dict[str, dict[str, str]] = field(default_factory=dict)  # backend -> Cost fields for "fast"


PHASES = [
    Phase("all up"),
    Phase("worker down", down={"worker"}),
    Phase("worker back", costs={}),
    Phase("worker down, replicate throttled", down={"worker"}, throttled={"replicate"}),
    Phase("GPU price x3", costs={"worker": {"gpu_seconds": "12"}}),
    Phase("fal down, replicate price x2", down={"fal"}, costs={"replicate": {"per_image": "0.02"}}),
    Phase("only replicate", down={"fal", "worker"}),
]


def unit_cost(backend: str, book: dict[str, dict[str, str]]) -> Decimal:
    """What one 1024x1024 fast image costs on ``backend`` under the current price book (the oracle's view)."""
    c = {k: Decimal(v) for k, v in book[backend].items()}
    return (
        c.get("per_image", Decimal(0))
        + c.get("per_megapixel", Decimal(0)) * MP
        + c.get("gpu_seconds", Decimal(0)) * GPU_RATE
    )


async def run_phase(client: httpx.AsyncClient, key: str, count: int, concurrency: int) -> list[httpx.Response]:
    todo = iter(range(count))
    done: list[httpx.Response] = []

    async def worker() -> None:
        for _ in todo:
            done.append(
                await client.post(
                    "/v1/images/generations",
                    json={"model": "hidream-i1-fast", "prompt": "a fox"},
                    headers={"Authorization": f"Bearer {key}"},
                )
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done


def main() -> None:
    logging.basicConfig(level=logging.ERROR)  # failed attempts are expected here; the table is the output
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-phase", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--breaker-open-seconds", type=float, default=2.0)
    args = parser.parse_args()

    worker = ServerThread(instant_worker_app(1024, 1024)).start()
    replicate, fal = FakeReplicate().start(), FakeFal().start()
    servers: dict[str, Any] = {"worker": worker, "replicate": replicate, "fal": fal}
    book = {
        "worker": {"gpu_seconds": "4"},
        "replicate": {"per_image": "0.010"},
        "fal": {"per_megapixel": "0.01"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            admin_token=ADMIN,
            backends=["worker", "replicate", "fal"],
            worker_urls=[worker.url],
            replicate_api_token=replicate.token,
            replicate_base_url=replicate.url,
            replicate_output_hosts=[replicate.url],
            fal_key=fal.key,
            fal_base_url=fal.url,
            fal_output_hosts=[fal.url],
            provider_poll_seconds=0.02,
            breaker_open_seconds=args.breaker_open_seconds,
            attempt_timeout_seconds=5,
        )
        gateway = ServerThread(create_app(settings)).start()
        admin = {"Authorization": f"Bearer {ADMIN}"}
        key = httpx.post(f"{gateway.url}/admin/tenants", json={"name": "sim"}, headers=admin).json()["api_key"]
        print(
            f"{args.per_phase} requests a phase, concurrency {args.concurrency}, "
            f"breaker open {args.breaker_open_seconds} s; fast 1024x1024"
        )
        print(f"{'phase':32s} {'served':>7s} {'gateway $/img':>14s} {'oracle $/img':>13s} {'ratio':>6s}  served by")
        total_cost = oracle_cost = Decimal(0)
        served = sent = 0
        stopped: set[str] = set()
        try:
            for phase in PHASES:
                for name, srv in servers.items():
                    if name in phase.down and name not in stopped:
                        srv.stop()
                        stopped.add(name)
                    elif name not in phase.down and name in stopped:
                        srv.start()
                        stopped.discard(name)
                    if hasattr(srv, "faults"):
                        srv.faults.throttle = name in phase.throttled
                        srv.faults.retry_after_s = 2
                for name, cost in phase.costs.items():
                    book[name] = cost
                    httpx.put(f"{gateway.url}/admin/backends/{name}/costs", json={"fast": cost}, headers=admin)
                live = [n for n in servers if n not in phase.down and n not in phase.throttled]
                oracle = min(unit_cost(n, book) for n in live)
                before = {e["prediction_id"] for e in _usage(gateway.url, admin)}
                start = time.perf_counter()
                responses = asyncio.run(_phase(gateway.url, key, args.per_phase, args.concurrency))
                wall = time.perf_counter() - start
                events = [e for e in _usage(gateway.url, admin) if e["prediction_id"] not in before]
                ok = sum(r.status_code == 200 for r in responses)
                cost = sum((Decimal(e["cost_usd"]) for e in events if e["status"] == "succeeded"), Decimal(0))
                by: dict[str, int] = {}
                for e in events:
                    by[e["backend"]] = by.get(e["backend"], 0) + 1
                mean = cost / max(ok, 1)
                print(
                    f"{phase.name:32s} {ok / len(responses):7.1%} {mean:14.6f} {oracle:13.6f} "
                    f"{mean / oracle:6.3f}  {by} ({wall:.1f} s)"
                )
                total_cost += cost
                oracle_cost += oracle * ok
                served += ok
                sent += len(responses)
        finally:
            gateway.stop()
            for name, srv in servers.items():
                if name not in stopped:
                    srv.stop()
        print(
            f"{'total':32s} {served / sent:7.1%} {total_cost / served:14.6f} {oracle_cost / served:13.6f} "
            f"{total_cost / oracle_cost:6.3f}"
        )


async def _phase(url: str, key: str, count: int, concurrency: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await run_phase(client, key, count, concurrency)


def _usage(url: str, admin: dict[str, str]) -> list[dict[str, Any]]:
    body = httpx.get(f"{url}/admin/usage/events", params={"limit": 10_000}, headers=admin, timeout=60).json()
    data: list[dict[str, Any]] = body["data"]
    return data


if __name__ == "__main__":
    main()
