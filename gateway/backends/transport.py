"""An httpx transport that sends with aiohttp: the backends keep httpx's API, and each call costs a tenth of the CPU.

Measured on the development machine (bench/http_clients.py): a small JSON POST to a local server costs about
650 µs of CPU through httpx's own transport and about 180 µs through this one; at 32 calls in flight, 1,160 µs
against under 200 µs, since httpx's pool does work per waiting request. The gateway makes one to three such calls
per image, so the transport was most of its CPU.

What the rest of the gateway relies on is kept: httpx's connect and read timeouts, its exceptions (ConnectError,
ConnectTimeout, ReadTimeout, RemoteProtocolError, ReadError), bodies that are streamed and decoded by httpx (aiohttp
passes them through undecoded, so a size cap counts decoded bytes), URLs sent exactly as httpx encoded them, no
redirects and no cookies of its own, and the HTTP(S)_PROXY and NO_PROXY variables. Two differences: the wait for a
free connection (at most ``max_connections``) has no timeout of its own (each caller's deadline bounds it, so a
full pool is never blamed on the provider as an unreachable host), and httpx's write timeout is not applied. A
request that names a TLS server name (``sni_hostname``) is refused, as this transport cannot set one: the webhook
sender, which needs it, has a client on httpx's own transport.

``AiohttpClient`` is the httpx client the backends share: over this transport, and with a shorter way for the plain
calls they make most (a method, a URL, headers, a JSON or bytes body, a timeout), which go to aiohttp without
httpx's client layer (request building, auth and redirect handling, cookies), about half of what is left per call.
Neither way keeps cookies.

Example::

    client = AiohttpClient(max_connections=256, timeout=httpx.Timeout(30.0, connect=5.0))
    resp = await client.request("POST", url, json={"prompt": "a fox"}, headers={"Authorization": "Bearer t"})
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import json as jsonlib
import re
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any, NoReturn

import aiohttp
import httpx
import yarl

CHUNK = 64 << 10
MAX_HEADER_BYTES = 64 << 10  # a header line or field (aiohttp's default, 8 KB, is below what httpx accepts)


class _Body(httpx.AsyncByteStream):
    """The response body as aiohttp reads it, with its errors as httpx's."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK):
                yield chunk
        except Exception as exc:
            _reraise(exc, self._request)

    async def aclose(self) -> None:
        self._response.release()


def _reraise(exc: Exception, request: httpx.Request) -> NoReturn:
    """Raise the httpx exception for what aiohttp raised (anything else as it is)."""
    translated = _translated(exc, request)
    if translated is exc:
        raise exc
    if isinstance(translated, httpx.ProxyError):
        # The original's text carries the proxy's URL, credentials and all: not chained (and, raised outside an
        # except block by the callers that can meet a proxy, not reachable as its __context__ either).
        raise translated from None
    raise translated from exc


def _translated(exc: Exception, request: httpx.Request) -> Exception:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientHttpProxyError):  # its text names the proxy URL, credentials and all (_reraise)
        return httpx.ProxyError(f"The proxy refused the request ({exc.status}).", request=request)
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(exc, aiohttp.SocketTimeoutError | asyncio.TimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError(message, request=request)
    if isinstance(exc, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(message, request=request)
    if isinstance(exc, aiohttp.ClientError | OSError):
        return httpx.ReadError(message, request=request)
    return exc


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Send httpx requests over one aiohttp session (created in the running loop at the first request)."""

    def __init__(self, *, max_connections: int = 256) -> None:
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Read once, as httpx reads them when a client is made (aiohttp's trust_env would read ~/.netrc per request).
        self._proxies = urllib.request.getproxies()
        self._bypass: dict[str, bool] = {}

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:  # one session per event loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=10),
                auto_decompress=False,  # httpx decodes (and callers cap what it decodes)
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),  # httpx sets its own
                max_line_size=MAX_HEADER_BYTES,
                max_field_size=MAX_HEADER_BYTES,
            )
            self._loop = loop
        return self._session

    def _proxy(self, url: httpx.URL) -> str | None:
        """The environment's proxy for ``url`` (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY), unless NO_PROXY exempts it."""
        proxy = self._proxies.get(url.scheme) or self._proxies.get("all")
        if proxy is None:
            return None
        if not proxy.startswith(("http://", "https://")):  # e.g. socks5://: this transport speaks HTTP proxies only
            raise httpx.ProxyError("Only HTTP proxies are supported (the environment names another kind).")
        host = url.host
        if host not in self._bypass:
            if len(self._bypass) > 1000:
                self._bypass.clear()
            self._bypass[host] = bool(urllib.request.proxy_bypass(host))
        return None if self._bypass[host] else proxy

    async def _send(
        self,
        method: str,
        url: httpx.URL,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: aiohttp.ClientTimeout,
    ) -> aiohttp.ClientResponse:
        return await self._client().request(
            method,
            yarl.URL(str(url), encoded=True),  # as httpx encoded it (a signed URL must not change)
            headers=headers,
            data=body or None,
            allow_redirects=False,
            timeout=timeout,
            compress=None,
            proxy=self._proxy(url),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if "sni_hostname" in request.extensions:
            raise httpx.UnsupportedProtocol("This transport cannot set a TLS server name.", request=request)
        spans = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=spans.get("connect"), sock_read=spans.get("read"))
        body = await request.aread()  # sent whole, with its Content-Length: never chunked
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        headers = [(k, v) for k, v in raw if k.lower() != "transfer-encoding"]
        for name, value in headers:  # refused as httpx's own transport refuses them (aiohttp raises a ValueError)
            if not _NO_CONTROLS.match(value) or not _PRINTABLE.match(name):
                raise httpx.LocalProtocolError(f"Illegal header {name!r}", request=request)
        if body and not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        failed: Exception | None = None
        try:
            response = await self._send(request.method, request.url, headers, body, timeout)
        except Exception as exc:
            failed = exc
        if failed is not None:  # raised here, outside the except: a refused proxy's error then carries nothing of it
            _reraise(failed, request)
        return httpx.Response(
            response.status,
            headers=[(k, v) for k, v in response.raw_headers],
            stream=_Body(response, request),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _plain(content: Any, json: Any, headers: Any) -> bool:
    """Whether a call is one the short way sends as httpx would: bytes or JSON (not both), and headers a plain
    dict of printable ASCII text (anything else, httpx checks, encodes or refuses in ways of its own)."""
    if content is not None and (json is not None or not isinstance(content, bytes)):
        return False
    if headers is None:
        return True
    if type(headers) is not dict:
        return False
    return all(
        isinstance(k, str) and isinstance(v, str) and _PRINTABLE.match(k) and _VALUE.match(v)
        for k, v in headers.items()
    )


_PRINTABLE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")  # a header name (RFC 9110 token)
_VALUE = re.compile(r"[\x20-\x7e\t]*\Z")  # printable ASCII and tabs: no CR, LF or other controls
_NO_CONTROLS = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*\Z")  # what HTTP allows in a value sent as bytes


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Refuse every cookie: the client is shared by every tenant's jobs, and no provider API needs one."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: Any) -> bool:
        return False


class AiohttpClient(httpx.AsyncClient):
    """httpx's client over ``AiohttpTransport``, whose plain ``request`` calls skip httpx's client layer.

    A call with only ``content`` or ``json``, ``headers`` and ``timeout`` is sent by the transport at once, with
    what httpx would have sent (the client's default headers under the call's, the JSON encoded as httpx encodes
    it, the URL as httpx encodes it) and answered as an ``httpx.Response`` read whole, with httpx's exceptions.
    Anything else (``stream``, ``params``, ``follow_redirects``, ...) goes through httpx as usual.
    """

    def __init__(
        self, *, max_connections: int = 256, timeout: httpx.Timeout, headers: Mapping[str, str] | None = None
    ) -> None:
        self._aio = AiohttpTransport(max_connections=max_connections)
        super().__init__(timeout=timeout, headers=headers, transport=self._aio)
        self.cookies.jar.set_policy(_NoCookies())  # for the calls httpx sends (streams, unusual arguments)
        self._urls: dict[str, httpx.URL] = {}  # parsed once: a backend calls the same few URLs over and over

    def _url(self, url: httpx.URL | str) -> httpx.URL:
        if not isinstance(url, str):
            return httpx.URL(url)
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= 256:  # ids in paths make new ones: keep the newest few
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        auth: Any = httpx.USE_CLIENT_DEFAULT,
        follow_redirects: Any = httpx.USE_CLIENT_DEFAULT,
    ) -> httpx.Response:
        """httpx's ``send``; a request sent with ``auth=None`` and ``follow_redirects=False`` (an output download)
        goes straight to the transport, past httpx's auth, redirect, cookie and hook layers, which would do nothing
        for it. Its response has no ``elapsed``."""
        if auth is not None or follow_redirects is not False or request.url.userinfo or any(self.event_hooks.values()):
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        self._refuse_if_closed()
        if "timeout" not in request.extensions:  # as httpx's send: the client's timeout, unless the request has one
            request.extensions = {**request.extensions, "timeout": self.timeout.as_dict()}
        response = await self._aio.handle_async_request(request)
        response.request = request
        response.default_encoding = self._default_encoding
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    def _refuse_if_closed(self) -> None:
        if self.is_closed:  # as httpx refuses (aiohttp would open a new session)
            raise RuntimeError("Cannot send a request, as the client has been closed.")

    async def request(  # type: ignore[override]
        self,
        method: str,
        url: httpx.URL | str,
        *,
        content: bytes | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: Any = httpx.USE_CLIENT_DEFAULT,
        **other: Any,
    ) -> httpx.Response:
        # httpx's get(), post(), ... pass every argument, most at their defaults (which mean nothing here).
        unusual = any(v is not None and v is not httpx.USE_CLIENT_DEFAULT for v in other.values())
        if unusual or not _plain(content, json, headers):
            return await super().request(
                method, url, content=content, json=json, headers=headers, timeout=timeout, **other
            )
        self._refuse_if_closed()
        method = method.upper()
        target = self._url(url)
        # By lower-case name, as httpx merges them: the call's own replace the client's, in the call's spelling.
        sent = {k.decode().lower(): (k.decode(), v.decode("latin-1")) for k, v in self.headers.raw}
        for name, value in (headers or {}).items():
            sent[name.lower()] = (name, value)
        body = content or b""
        if json is not None:
            body = jsonlib.dumps(json, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
            sent.setdefault("content-type", ("Content-Type", "application/json"))
        if body or method in ("POST", "PUT", "PATCH"):
            sent.setdefault("content-length", ("Content-Length", str(len(body))))
        spans = self.timeout if timeout is httpx.USE_CLIENT_DEFAULT else httpx.Timeout(timeout)
        limits = aiohttp.ClientTimeout(total=None, sock_connect=spans.connect, sock_read=spans.read)
        request = httpx.Request(method, target)  # for the answer and the errors (what was sent is above)
        failed: Exception | None = None
        try:
            response = await self._aio._send(method, target, list(sent.values()), body, limits)
            try:
                payload = await response.read()
            finally:
                response.release()
        except Exception as exc:
            failed = exc
        if failed is not None:  # as in handle_async_request
            _reraise(failed, request)
        return httpx.Response(response.status, headers=list(response.raw_headers), content=payload, request=request)
