"""Cold start and generation time of the gateway on the tiny model (CPU), through real HTTP.

Run: .venv/bin/python bench/tiny_pipeline.py [--runs 3]

Prints: time for `hidream-gateway serve` on an empty data dir to become ready (this includes building the
tiny model and migrating a new SQLite database), the same on a warm data dir, and the latency of
1024x1024 generations per model at its default steps, measured by an HTTP client.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from tests.fakes.server import free_port

CLI = str(Path(sys.executable).parent / "hidream-gateway")


def start_and_wait(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, float]:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [CLI, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise SystemExit("gateway exited during start-up")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HDG_")} | {"HDG_DATA_DIR": tmp}
        proc, url, cold = start_and_wait(env)
        proc.terminate()
        proc.wait()
        proc, url, warm = start_and_wait(env)
        try:
            created = subprocess.run(
                [CLI, "tenants", "create", "bench"], env=env, capture_output=True, check=True, text=True
            )
            key = json.loads(created.stdout)["api_key"]
            headers = {"Authorization": f"Bearer {key}"}
            print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}")
            print(f"serve ready, empty data dir (builds tiny model):  {cold:6.2f} s")
            print(f"serve ready, warm data dir:                        {warm:6.2f} s")
            print("generation latency over HTTP, 1024x1024, n=1, default steps (median of runs):")
            with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
                for model in ("hidream-i1-fast", "hidream-i1-dev", "hidream-i1-full"):
                    times = []
                    for seed in range(args.runs):
                        t0 = time.perf_counter()
                        resp = client.post(
                            "/v1/images/generations", json={"model": model, "prompt": "a fox", "seed": seed}
                        )
                        resp.raise_for_status()
                        times.append(time.perf_counter() - t0)
                    runs = ", ".join(f"{t:.2f}" for t in times)
                    print(f"  {model:16s} {statistics.median(times):6.2f} s   (runs: {runs})")
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
