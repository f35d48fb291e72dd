"""The gateway as a real operating-system process, so a test can SIGKILL it mid-job and start it again.

Example::

    env = {"HDG_DATA_DIR": str(tmp_path / "data"), "HDG_BACKENDS": "fal", ...}
    with GatewayProcess(env, log_path=tmp_path / "a.log") as gw:
        httpx.get(f"{gw.url}/healthz")
        gw.kill()  # no shutdown code runs: leases stay held, connections drop
        gw.restart()  # same port, same environment, same data

The process gets only the environment it is given (plus PATH, HOME and the like), never the test run's own
``HDG_*`` or provider variables, so what a test sets is what the gateway sees.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO

import httpx

from tests.fakes.server import free_port

ROOT = Path(__file__).resolve().parent.parent
# Settings the gateway reads from the environment outside the HDG_ prefix (gateway/settings.py aliases).
_PROVIDER_VARIABLES = ("FAL_KEY", "REPLICATE_API_TOKEN")


def _base_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HDG_") and k not in _PROVIDER_VARIABLES} | {
        "PYTHONUNBUFFERED": "1"
    }


class GatewayProcess:
    """``uvicorn --factory gateway.app:app_from_env`` on its own loopback port, logging to ``log_path``."""

    def __init__(
        self, env: Mapping[str, str], *, log_path: Path, port: int | None = None, startup_timeout: float = 60.0
    ) -> None:
        self.env = _base_environment() | dict(env)
        self.log_path = log_path
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> GatewayProcess:
        """Start the process and return once ``GET /healthz`` answers (migrations have run by then)."""
        if self.alive:
            raise RuntimeError(f"the gateway on port {self.port} is already running")
        self._log = self.log_path.open("ab")  # appended to, so a restart keeps the first run's log
        self._log.write(f"--- starting on port {self.port} ---\n".encode())
        self._log.flush()
        command = [sys.executable, "-m", "uvicorn", "--factory", "gateway.app:app_from_env"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.proc = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2) as client:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the gateway did not answer within {self.startup_timeout} s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to release leases, finish requests or close anything."""
        self._stop(signal.SIGKILL)

    def terminate(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown: uvicorn runs the lifespan's exit), SIGKILL if it takes over ``timeout``."""
        self._stop(signal.SIGTERM, timeout)

    def restart(self) -> GatewayProcess:
        """Start again on the same port with the same environment (terminating it first if it still runs)."""
        self.terminate()
        return self.start()

    def _stop(self, sig: signal.Signals, timeout: float = 30.0) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 6000) -> str:
        """The end of everything the process wrote (both runs, after a restart)."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
