"""Where the gateway's CPU goes: shares of a py-spy profile, by thread and, on the event loop, by part of the work.

Run (worker backend, SQLite, 32 clients; py-spy installed in the venv, not a dependency):

    .venv/bin/python bench/gateway_overhead.py --requests 3000 --concurrency 32 \\
        --wrap-gateway ".venv/bin/py-spy record -r 97 --gil --threads -f raw -o prof.txt --"
    .venv/bin/python bench/profile_shares.py prof.txt

With ``--gil`` py-spy samples only the thread holding the GIL, so the shares are of the Python work, the resource
one process has one of; the SQLite writer's and the file writes' time in C (SQLite itself, the kernel) is not in
them. Start-up (imports, building the app) is left out.
"""

from __future__ import annotations

import argparse
from collections import Counter

# On the event loop, the first rule that matches a sample's stack names its part.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("the handler: Engine.submit (job row, record hand-off)", ("Engine.submit",)),
    ("the handler: body, checks, limits, answer", ("create_image",)),
    ("the backend call: AiohttpClient and aiohttp", ("AiohttpClient.request", "ClientRequest.write_bytes")),
    ("the backend call: AiohttpClient and aiohttp", ("ResponseHandler.data_received",)),
    ("the job: settle (fields, webhook bodies, hand-off)", ("JobRunner._settle_retrying", "JobRunner._settle")),
    ("the job: image check (PIL)", ("decode", "normalise")),
    ("the job: storing the file (hand-off)", ("JobRunner._save_all", "LocalFileStore.save")),
    ("the job: routing, health, metrics, the rest", ("JobRunner.execute",)),
    ("server and framework: uvicorn, Starlette/FastAPI routing, middleware", ("FastAPI.__call__",)),
    ("server and framework: uvicorn, Starlette/FastAPI routing, middleware", ("RequestResponseCycle.run_asgi",)),
    ("server and framework: uvicorn, Starlette/FastAPI routing, middleware", ("HttpToolsProtocol.data_received",)),
    ("background loops (claim, heartbeat, webhooks)", ("Session.scalar", "Session.execute")),
]
LOOP = "the event loop itself: callbacks, futures, timers"


def part(names: list[str]) -> str:
    if "create_image" in names and "Engine.submit" not in names:
        return PARTS[1][0]
    for name, marks in PARTS:
        if any(mark in names for mark in marks):
            return name
    return LOOP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="py-spy's raw output (-f raw --threads)")
    args = parser.parse_args()
    threads: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            names = [f.split(" (")[0] for f in frames]
            thread = frames[0].split("): ")[-1]
            if thread == "MainThread" and "Runner.run" not in names:
                continue  # start-up
            if thread.startswith(("uvloop_", "asyncio_")):
                thread = "file writes (the loop's thread pool)"
            elif thread.startswith("hdg-sqlite-writer"):
                thread = "the SQLite writer"
            elif thread == "MainThread":
                thread = "the event loop (main thread)"
                parts[part(names)] += int(count)
            threads[thread] += int(count)
    total, loop = sum(threads.values()), sum(parts.values())
    print(f"samples holding the GIL, by thread ({total}):")
    for name, n in threads.most_common():
        print(f"  {100 * n / total:5.1f}%  {name}")
    print(f"on the event loop ({loop}):")
    for name, n in parts.most_common():
        print(f"  {100 * n / loop:5.1f}%  {name}")


if __name__ == "__main__":
    main()
