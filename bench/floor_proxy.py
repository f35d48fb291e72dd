"""The least a Python proxy can do per request, for bench/gateway_overhead.py --floor: one uvicorn process that reads
the request, makes the worker call to the upstream with aiohttp, and answers a fixed JSON body. No authentication,
no database, no file, no validation: what is left is uvicorn, the event loop and one aiohttp call.

Served as ``uvicorn bench.floor_proxy:app`` with ``HDG_FLOOR_UPSTREAM`` set to the upstream's base URL.
"""

from __future__ import annotations

import json
import os
from typing import Any

import aiohttp

UPSTREAM = os.environ.get("HDG_FLOOR_UPSTREAM", "")
CALL = json.dumps({"variant": "fast", "prompt": "a fox", "width": 1024, "height": 1024}).encode()
ANSWER = json.dumps({"created": 0, "data": [{"url": "http://127.0.0.1/files/x.png"}]}).encode()
_session: aiohttp.ClientSession | None = None


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global _session
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        if _session is not None:
            await _session.close()
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    if _session is None:
        _session = aiohttp.ClientSession()
    headers = {"Content-Type": "application/json"}
    async with _session.post(f"{UPSTREAM}/generate", data=CALL, headers=headers) as upstream:
        await upstream.read()
        status = 200 if upstream.status == 200 else 502
    length = str(len(ANSWER)).encode()
    start = {"type": "http.response.start", "status": status}
    await send(start | {"headers": [(b"content-type", b"application/json"), (b"content-length", length)]})
    await send({"type": "http.response.body", "body": ANSWER})
