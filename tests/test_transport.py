"""The backends' HTTP transport (httpx's API, aiohttp's sending), over real sockets: what callers rely on is kept."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.backends.transport import AiohttpClient, AiohttpTransport
from tests.fakes.server import ServerThread, free_port


def _app() -> Starlette:
    async def echo(request: Request) -> JSONResponse:
        body = await request.body()
        kept = ("authorization", "content-type", "x-custom", "host")
        headers = {k: v for k, v in request.headers.items() if k in kept}
        return JSONResponse(
            {"method": request.method, "body": body.decode(), "headers": headers, "query": str(request.query_params)},
            status_code=201,
            headers={"X-Answer": "yes"},
        )

    async def seen(request: Request) -> JSONResponse:
        # Everything that arrived: the raw target as sent, every header, the body.
        scope = request.scope
        target = (scope["raw_path"] + b"?" + scope["query_string"]).decode()
        body = (await request.body()).decode()
        headers = sorted([k.decode(), v.decode()] for k, v in scope["headers"])  # a list: duplicates would show
        return JSONResponse({"method": request.method, "target": target, "headers": headers, "body": body})

    async def cookie(request: Request) -> JSONResponse:
        answer = JSONResponse({"cookie": request.headers.get("cookie")})
        answer.set_cookie("session", "tenant-a")
        return answer

    async def gzipped(_: Request) -> Response:
        return Response(gzip.compress(b"x" * 100_000), headers={"Content-Encoding": "gzip"}, media_type="text/plain")

    async def moved(_: Request) -> RedirectResponse:
        return RedirectResponse("/echo", status_code=302)

    async def slow(_: Request) -> JSONResponse:
        await asyncio.sleep(2)
        return JSONResponse({})

    async def chunks(_: Request) -> StreamingResponse:
        async def parts() -> Any:
            for i in range(5):
                yield f"part{i};".encode()

        return StreamingResponse(parts(), media_type="text/plain")

    return Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/seen", seen, methods=["GET", "POST", "PUT", "DELETE"]),
            Route("/cookie", cookie),
            Route("/gzip", gzipped),
            Route("/moved", moved),
            Route("/slow", slow),
            Route("/chunks", chunks),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    srv = ServerThread(_app()).start()
    yield srv
    srv.stop()


# Each test runs on both: httpx's client over the transport, and the gateway's client, whose plain calls skip httpx's
# client layer (AiohttpClient's short way). What callers rely on must hold on either.
CLIENTS = {
    "transport": lambda **kw: httpx.AsyncClient(transport=AiohttpTransport(max_connections=8), **kw),
    "client": lambda **kw: AiohttpClient(max_connections=8, timeout=httpx.Timeout(5.0), **kw),
}


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> Any:
    return CLIENTS[request.param]


def test_requests_and_answers_arrive_whole(server: ServerThread, make_client: Any) -> None:
    async def main() -> None:
        async with make_client(headers={"Authorization": "Bearer t0ken"}) as client:
            resp = await client.post(
                f"{server.url}/echo", params={"a": "1"}, json={"prompt": "é fox"}, headers={"X-Custom": "v"}
            )
            assert resp.status_code == 201 and resp.headers["x-answer"] == "yes"
            body = resp.json()
            assert body["method"] == "POST" and body["query"] == "a=1"
            assert json.loads(body["body"]) == {"prompt": "é fox"}
            assert body["headers"] == {
                "authorization": "Bearer t0ken",
                "content-type": "application/json",
                "x-custom": "v",
                "host": server.url.removeprefix("http://"),  # sent once, as httpx set it
            }
            for method in ("GET", "PUT", "DELETE"):  # one pooled connection after another, bodies or none
                again = await client.request(method, f"{server.url}/echo", content=b"raw" if method == "PUT" else None)
                assert again.status_code == 201 and again.json()["method"] == method
                assert again.json()["body"] == ("raw" if method == "PUT" else "")
            streamed = await client.get(f"{server.url}/chunks")
            assert streamed.text == "part0;part1;part2;part3;part4;"

    asyncio.run(main())


def test_bodies_are_decoded_by_httpx_and_redirects_are_not_followed(server: ServerThread, make_client: Any) -> None:
    async def main() -> None:
        async with make_client() as client:
            resp = await client.get(f"{server.url}/gzip")
            assert resp.content == b"x" * 100_000  # httpx decoded it
            async with client.stream("GET", f"{server.url}/gzip") as streamed:  # and callers can cap decoded bytes
                raw = b"".join([chunk async for chunk in streamed.aiter_raw()])
            assert gzip.decompress(raw) == b"x" * 100_000
            moved = await client.get(f"{server.url}/moved")
            assert moved.status_code == 302 and moved.headers["location"] == "/echo"

    asyncio.run(main())


def test_failures_are_httpx_exceptions(server: ServerThread, make_client: Any) -> None:
    # A port nobody listens on; a server that accepts and hangs up without answering.
    closed = free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    hangs_up = listener.getsockname()[1]

    def accept_and_close() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=accept_and_close, daemon=True).start()

    async def main() -> None:
        async with make_client() as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed}/")
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"http://127.0.0.1:{hangs_up}/")
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{server.url}/slow", timeout=httpx.Timeout(5, read=0.3))
            # A TLS server name is something this transport cannot set: refused, not silently dropped.
            with pytest.raises(httpx.UnsupportedProtocol):
                await client.get(f"{server.url}/echo", extensions={"sni_hostname": "example.com"})
            assert (await client.get(f"{server.url}/echo")).status_code == 201  # still usable after all that

    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_environment_proxies_are_honoured_as_httpx_honours_them(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    # The test server plays the proxy: a proxied request reaches it with the target's name as Host.
    monkeypatch.setenv("HTTP_PROXY", server.url)
    monkeypatch.setenv("NO_PROXY", "direct.invalid")

    async def main() -> None:
        async with make_client() as client:
            proxied = await client.get("http://origin.invalid/echo")
            assert proxied.status_code == 201 and proxied.json()["headers"]["host"] == "origin.invalid"
            with pytest.raises(httpx.ConnectError):  # exempt: sent straight to a name that does not resolve
                await client.get("http://direct.invalid/echo")

    asyncio.run(main())


def test_a_proxy_this_transport_cannot_speak_fails_the_call_instead_of_being_skipped(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ALL_PROXY", "socks5://user:s3cret@127.0.0.1:1080")

    async def main() -> None:
        async with make_client() as client:
            with pytest.raises(httpx.ProxyError) as refused:  # never sent around the proxy the operator set
                await client.get(f"{server.url}/echo")
            assert "s3cret" not in str(refused.value)

    asyncio.run(main())


def test_the_short_way_sends_what_httpx_sends(server: ServerThread) -> None:
    # The same calls through httpx's own client and transport, and through the gateway's client: the server sees
    # the same request line (the URL as httpx encodes it: a provider's signed URL must arrive unchanged), the same
    # headers and the same body.
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/seen", {"json": {"prompt": "é fox", "n": 2}, "headers": {"Authorization": "Bearer t"}}),
        ("POST", "/seen", {"json": [1, "x"], "headers": {"content-type": "application/vnd.api+json"}}),
        ("post", "/seen", {"content": b"{}", "headers": {"User-Agent": "mine", "Accept": "application/json"}}),
        ("POST", "/seen", {"content": b"raw bytes", "headers": {"Content-Type": "application/octet-stream"}}),
        ("POST", "/seen", {"headers": {"X-Custom": "v"}}),
        ("GET", "/seen?sig=a%2Fb%3D&x=%7E&y=caf%C3%A9&z=a b", {"headers": {"authorization": "Token lower-case"}}),
        ("PUT", "/seen", {}),
        ("DELETE", "/seen", {"timeout": 3}),
    ]

    async def main() -> None:
        async with httpx.AsyncClient() as plain, AiohttpClient(timeout=httpx.Timeout(5.0)) as short:
            for method, path, kwargs in calls:
                expected = (await plain.request(method, f"{server.url}{path}", **kwargs)).json()
                got = (await short.request(method, f"{server.url}{path}", **kwargs)).json()
                for seen in (expected, got):  # aiohttp says "Content-Length: 0" on a DELETE without a body
                    seen["headers"] = [h for h in seen["headers"] if h != ["content-length", "0"]]
                assert got == expected, (method, path)

    asyncio.run(main())


def test_the_gateways_client_keeps_no_cookies(server: ServerThread) -> None:
    # One client serves every tenant's jobs: a cookie a provider set for one must never ride along on the next,
    # whether the call went the short way or through httpx (a stream).
    async def main() -> None:
        async with AiohttpClient(timeout=httpx.Timeout(5.0)) as client:
            first = await client.request("GET", f"{server.url}/cookie")
            assert "session=tenant-a" in first.headers["set-cookie"]
            assert (await client.request("GET", f"{server.url}/cookie")).json() == {"cookie": None}
            async with client.stream("GET", f"{server.url}/cookie") as streamed:
                await streamed.aread()
            assert (await client.get(f"{server.url}/cookie")).json() == {"cookie": None}

    asyncio.run(main())


def test_the_short_way_answers_and_refuses_as_httpx_does(server: ServerThread) -> None:
    async def main() -> None:
        client = AiohttpClient(timeout=httpx.Timeout(5.0))
        resp = await client.request("GET", f"{server.url}/moved")
        assert resp.request.url == f"{server.url}/moved"  # the answer knows its request, as httpx's do
        with pytest.raises(httpx.HTTPStatusError):
            resp.raise_for_status()
        # What httpx's client layer refuses (a header value that is not ASCII, a line break in one) goes to it.
        for bad in ({"X-Name": "café"}, {"X-Token": "t\r\nInjected: 1"}):
            with pytest.raises(Exception) as by_httpx:
                await httpx.AsyncClient().request("GET", f"{server.url}/seen", headers=bad)
            with pytest.raises(type(by_httpx.value)):
                await client.request("GET", f"{server.url}/seen", headers=bad)
        await client.aclose()
        with pytest.raises(RuntimeError, match="closed"):  # not sent on a session made anew
            await client.request("GET", f"{server.url}/seen")

    asyncio.run(main())


def test_a_proxys_refusal_carries_none_of_its_credentials_anywhere_in_the_chain(
    monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    # aiohttp's error names the proxy URL, user and password included: neither its text nor the error itself may
    # travel with what the gateway raises (an error reporter walks __cause__ and __context__).
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        proxy = await asyncio.start_server(refuse, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://user:s3cret@127.0.0.1:{port}")
        try:
            async with make_client() as client:
                with pytest.raises(httpx.ProxyError) as refused:
                    await client.get("https://origin.invalid/")
        finally:
            proxy.close()
        seen: BaseException | None = refused.value
        while seen is not None:
            assert "s3cret" not in f"{seen!s} {seen!r}"
            seen = seen.__cause__ or seen.__context__

    asyncio.run(main())


def test_a_download_sent_past_httpxs_client_layer_answers_as_httpx_does(server: ServerThread) -> None:
    # ProviderGate.download builds a request and sends it with auth=None, no redirects, streamed: AiohttpClient hands
    # that straight to its transport. httpx's own client gets the same answers for it: the body decoded (and read
    # as a stream, so a cap can count decoded bytes), a redirect returned rather than followed, what was sent.
    async def main() -> None:
        async with httpx.AsyncClient() as plain, AiohttpClient(timeout=httpx.Timeout(5.0)) as short:
            for path in ("/gzip", "/moved", "/chunks", "/seen", "/cookie"):
                answers = []
                for client in (plain, short):
                    request = client.build_request("GET", f"{server.url}{path}", timeout=5)
                    resp = await client.send(request, auth=None, follow_redirects=False, stream=True)
                    try:
                        body = b"".join([chunk async for chunk in resp.aiter_bytes()])
                    finally:
                        await resp.aclose()
                    answers.append((resp.status_code, resp.headers.get("location"), body, resp.request is request))
                assert answers[0] == answers[1], path
                assert answers[1][3]
            assert not short.cookies  # the provider's cookie was not kept
            unread = await short.send(
                short.build_request("GET", f"{server.url}/gzip"), auth=None, follow_redirects=False
            )
            assert unread.content == b"x" * 100_000 and unread.is_closed  # not streamed: read whole, as httpx does
        with pytest.raises(RuntimeError, match="closed"):
            await short.send(short.build_request("GET", f"{server.url}/seen"), auth=None, follow_redirects=False)
        # A request made without the client carries no timeout of its own: the client's applies, as in httpx.
        async with AiohttpClient(timeout=httpx.Timeout(0.3)) as hasty:
            with pytest.raises(httpx.ReadTimeout):
                await hasty.send(httpx.Request("GET", f"{server.url}/slow"), auth=None, follow_redirects=False)

    asyncio.run(main())
