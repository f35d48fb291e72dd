"""What storing one image costs the local file store, by where its directory is: CPU and wall time per file.

Run: .venv/bin/python bench/file_store.py [--files 500] [--size 20000] DIR [DIR ...]

Each file goes the way the gateway stores an image with ``HDG_STORAGE=local`` (``LocalFileStore``): a new temporary
file, written, fsynced and renamed into place, one after another in one thread. A new file's cost depends on the
filesystem and on where in it the directory lies, so the same code can cost several times more in one directory
than in another on the same disk: compare the directory a benchmark's data dir sits in with the others. The CPU is
this process's (its threads included); the kernel's own threads that write the journal are not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from gateway.storage.files import LocalFileStore


async def measure(parent: str, files: int, size: int) -> tuple[float, float]:
    """Median wall and mean CPU microseconds per stored file, in a throwaway directory under ``parent``."""
    data = os.urandom(size)
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        store = LocalFileStore(Path(tmp) / "files")
        walls: list[float] = []
        cpu = time.process_time()
        for i in range(files):
            start = time.perf_counter()
            await store.save(tenant_id="ten_bench", file_id=f"file_{i}", content_type="image/png", data=data)
            walls.append(time.perf_counter() - start)
        cpu = time.process_time() - cpu
    return statistics.median(walls) * 1e6, cpu / files * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="directories to make a throwaway store in")
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--size", type=int, default=20_000, help="bytes per file")
    args = parser.parse_args()
    print(f"{args.files} files of {args.size} bytes each; per file:")
    print(f"{'directory':<40} {'wall p50 µs':>12} {'CPU µs':>8}")
    for parent in args.dirs:
        wall, cpu = asyncio.run(measure(parent, args.files, args.size))
        print(f"{parent:<40} {wall:12.0f} {cpu:8.0f}")


if __name__ == "__main__":
    main()
