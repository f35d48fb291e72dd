"""The outbound gate: webhook addresses, provider API hosts and output downloads, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gateway.backends import fal as fal_backend
from gateway.backends import replicate as replicate_backend
from gateway.backends.base import ImageJob
from gateway.backends.fal import FalBackend
from gateway.backends.replicate import ReplicateBackend
from gateway.backends.transport import AiohttpClient
from gateway.errors import BackendFailed
from gateway.outbound import NetworkPolicy, ProviderGate, UnsafeUrl
from gateway.settings import Settings
from tests.fakes.fal import FakeFal
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import ServerThread, make_image

JOB = ImageJob(variant="fast", prompt="a fox", width=1024, height=1024, seed=5, output_format="png")


class Recorder:
    """A loopback server that records every request and answers as told: a webhook receiver or a file host.

    ``chunks`` > 0 streams ``body`` that many times without a Content-Length, ``chunk_delay`` seconds apart.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.body = b"ok"
        self.headers: dict[str, str] = {}
        self.chunks = 0
        self.chunk_delay = 0.0
        routes = [Route("/{path:path}", self._answer, methods=["GET", "POST", "PUT"])]
        self.server = ServerThread(Starlette(routes=routes))

    @property
    def url(self) -> str:
        return self.server.url

    async def _answer(self, request: Request) -> Response:
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": dict(request.headers),
                "body": await request.body(),
            }
        )
        if not self.chunks:
            return Response(self.body, status_code=self.status, headers=self.headers)

        async def trickle() -> AsyncIterator[bytes]:
            for _ in range(self.chunks):
                await asyncio.sleep(self.chunk_delay)
                yield self.body

        return StreamingResponse(trickle(), status_code=self.status, headers=self.headers)


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    with rec.server:
        yield rec


@pytest.fixture
def replicate() -> Iterator[FakeReplicate]:
    with FakeReplicate() as fake:
        yield fake


# --- NetworkPolicy: which webhook URLs are refused before any connection ---


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "gopher://example.com:70/_hello",
        "http://user:secret@example.com/hook",
        "http://user@example.com/hook",
        "http:///hook",
        "https://",
        "/relative/hook",
        "http://example.com:0/hook",
        "http://example.com:65536/hook",
        "http://example.com:99999/hook",
        "http://example.com:port/hook",
        "http://exa mple.com/hook",
        "http://example.com\\@127.0.0.1/hook",
        "http://example.com/hook\n",
        "https://example.com/" + "a" * 2000,
    ],
)
def test_check_syntax_refuses_what_is_not_plain_http_to_a_host(url: str) -> None:
    with pytest.raises(UnsafeUrl) as refused:
        NetworkPolicy().check_syntax(url)
    assert (refused.value.status_code, refused.value.code, refused.value.param) == (400, "unsafe_url", "webhook")


def test_check_syntax_accepts_ordinary_webhooks() -> None:
    for url in ("https://hooks.example.com/x?y=1", "http://93.184.215.14:8080/hook", "https://[2606:4700::1]/h"):
        NetworkPolicy().check_syntax(url)


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.8.9.10",
        "[::1]",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",  # the cloud metadata service
        "100.64.0.1",  # shared address space (carrier-grade NAT)
        "[fc00::1]",
        "[fd00:ec2::254]",  # AWS's IPv6 metadata service
        "[fe80::1]",
        "[fec0::1]",
        "224.0.0.1",
        "[ff02::1]",
        "0.0.0.0",  # noqa: S104 (a URL host under test, not a bind address)
        "[::]",
        "240.0.0.1",
        "255.255.255.255",
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[::ffff:169.254.169.254]",
        "[64:ff9b::a00:1]",  # NAT64 of 10.0.0.1
        "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
        "[::7f00:1]",  # IPv4-compatible, deprecated
        "localhost",  # a name, resolved through DNS
    ],
)
def test_resolve_refuses_every_address_that_is_not_public(host: str) -> None:
    with pytest.raises(UnsafeUrl, match="not a public address"):
        asyncio.run(NetworkPolicy().resolve(f"http://{host}:8080/hook"))


def test_resolve_lets_public_literals_through_without_dns() -> None:
    policy = NetworkPolicy()
    assert asyncio.run(policy.resolve("http://93.184.215.14/hook")) == ["93.184.215.14"]
    assert asyncio.run(policy.resolve("https://[2606:4700::6810:84e5]/h")) == ["2606:4700::6810:84e5"]
    assert asyncio.run(policy.resolve("https://[::ffff:93.184.215.14]/h")) == ["::ffff:5db8:d70e"]


def test_allowed_networks_let_named_private_addresses_through_and_only_those() -> None:
    policy = NetworkPolicy(["127.0.0.1/32", "10.0.0.0/8"])
    assert asyncio.run(policy.resolve("http://127.0.0.1:9000/hook")) == ["127.0.0.1"]
    assert asyncio.run(policy.resolve("http://10.200.0.7/hook")) == ["10.200.0.7"]
    for still_refused in ("127.0.0.2", "192.168.0.1", "169.254.169.254"):
        with pytest.raises(UnsafeUrl):
            asyncio.run(policy.resolve(f"http://{still_refused}/hook"))


class FakeDns:
    """Stands in for the outside world's DNS: answers for one name in turn, delegating every other name."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, *answers: list[str] | OSError) -> None:
        self.name, self.answers, self.calls = name, list(answers), 0
        self.real = loop.getaddrinfo

    async def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != self.name:
            return await self.real(host, port, *args, **kwargs)
        self.calls += 1
        answer = self.answers[min(self.calls, len(self.answers)) - 1]
        if isinstance(answer, OSError):
            raise answer
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [(family[6 if ":" in ip else 4], socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]


def test_a_name_with_any_private_answer_is_refused_and_an_unknown_name_too(monkeypatch: pytest.MonkeyPatch) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", FakeDns(loop, "mixed.example.com", ["93.184.215.14", "10.0.0.5"]))
        with pytest.raises(UnsafeUrl, match=r"10\.0\.0\.5"):
            await NetworkPolicy().resolve("https://mixed.example.com/hook")
        monkeypatch.setattr(loop, "getaddrinfo", FakeDns(loop, "gone.example.com", socket.gaierror(-2, "unknown")))
        with pytest.raises(UnsafeUrl, match="cannot be resolved"):
            await NetworkPolicy().resolve("https://gone.example.com/hook")

    asyncio.run(run())


def test_post_reaches_an_allowed_hook_with_the_original_host_header(recorder: Recorder) -> None:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient() as client:
            policy = NetworkPolicy(["127.0.0.1/32"])
            headers = {"Content-Type": "application/json", "Host": "somewhere-else.example"}
            return await policy.post(client, f"{recorder.url}/hook", content=b'{"a": 1}', headers=headers, timeout=5)

    assert asyncio.run(run()).status_code == 200
    [seen] = recorder.requests
    assert (seen["method"], seen["path"], seen["body"]) == ("POST", "/hook", b'{"a": 1}')
    assert seen["headers"]["host"] == f"127.0.0.1:{recorder.server.port}"  # ours, not the caller's


def test_post_refuses_a_private_hook_unless_allowed_and_sends_nothing(recorder: Recorder) -> None:
    async def run() -> None:
        async with httpx.AsyncClient() as client:
            await NetworkPolicy().post(client, f"{recorder.url}/hook", content=b"{}", headers={}, timeout=5)

    with pytest.raises(UnsafeUrl):
        asyncio.run(run())
    assert recorder.requests == []


def test_a_redirect_is_returned_to_the_caller_not_followed(recorder: Recorder) -> None:
    target = Recorder()
    with target.server:
        recorder.status, recorder.headers = 302, {"Location": f"{target.url}/internal-admin"}

        async def run() -> httpx.Response:
            async with httpx.AsyncClient(follow_redirects=True) as client:  # even a client that would follow
                policy = NetworkPolicy(["127.0.0.1/32"])
                return await policy.post(client, f"{recorder.url}/hook", content=b"{}", headers={}, timeout=5)

        assert asyncio.run(run()).status_code == 302
        assert len(recorder.requests) == 1 and target.requests == []


def test_dns_is_asked_once_and_the_connection_goes_to_the_address_checked(
    recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DNS rebinding: the address checked is the one connected to, and DNS is not asked again.

    The name exists only in this fake DNS (a later answer would even name a refused address), so a connection
    made by name instead of by the checked IP would fail to resolve, and the lookup count would show it.
    """
    port = recorder.server.port

    async def run() -> tuple[httpx.Response, int]:
        loop = asyncio.get_running_loop()
        dns = FakeDns(loop, "hooks.example.test", ["127.0.0.1"], ["127.0.0.2"])
        monkeypatch.setattr(loop, "getaddrinfo", dns)
        async with httpx.AsyncClient() as client:
            policy = NetworkPolicy(["127.0.0.1/32"])
            url = f"http://hooks.example.test:{port}/hook"
            return await policy.post(client, url, content=b"{}", headers={}, timeout=5), dns.calls

    resp, lookups = asyncio.run(run())
    assert resp.status_code == 200 and lookups == 1
    [seen] = recorder.requests
    assert seen["headers"]["host"] == f"hooks.example.test:{port}"


def test_https_posts_go_to_the_ip_with_the_name_kept_for_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async def run() -> int:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", FakeDns(loop, "hooks.example.com", ["93.184.215.14"]))
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            resp = await NetworkPolicy().post(
                client, "https://hooks.example.com/h?x=1", content=b"{}", headers={}, timeout=5
            )
            return resp.status_code

    assert asyncio.run(run()) == 204
    [request] = seen
    assert str(request.url) == "https://93.184.215.14/h?x=1"
    assert request.headers["host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"  # the certificate is checked for the name


# --- ProviderGate: where credentials may go and where outputs may come from ---


def _gate(*output_hosts: str, max_bytes: int = 1 << 20, timeout: float = 5) -> ProviderGate:
    return ProviderGate(
        "fal", api_base="https://queue.fal.run", output_hosts=output_hosts, max_bytes=max_bytes, timeout=timeout
    )


def test_api_url_passes_only_the_configured_api_origin() -> None:
    gate = _gate()
    for ok in ("https://queue.fal.run/fal-ai/x/requests/1/status", "https://QUEUE.fal.run:443/x"):
        assert gate.api_url(ok) == ok
    for bad in (
        "http://queue.fal.run/x",
        "https://queue.fal.run:8443/x",
        "https://evil.example/x",
        "https://queue.fal.run.evil.example/x",
        "https://key@queue.fal.run/x",
        "https://evil.example\\@queue.fal.run/x",
        "//queue.fal.run/x",
    ):
        with pytest.raises(BackendFailed, match="outside its API host"):
            gate.api_url(bad)


def test_output_hosts_match_hosts_wildcards_and_explicit_origins() -> None:
    gate = _gate("replicate.delivery", "*.fal.media", "http://127.0.0.1:8123")
    for ok in (
        "https://replicate.delivery/a.png",
        "https://v3.fal.media/files/x.png",
        "https://a.b.fal.media:443/x.png",
        "http://127.0.0.1:8123/files/a.png",
    ):
        gate.check_output(ok)
    for bad in (
        "http://replicate.delivery/a.png",  # a bare host means https only
        "https://replicate.delivery:8443/a.png",
        "https://pbxt.replicate.delivery/a.png",  # not listed as a wildcard here
        "https://fal.media/x.png",  # "*." is subdomains only
        "https://evilfal.media/x.png",
        "https://v3.fal.media.evil.example/x.png",
        "http://127.0.0.1:8124/files/a.png",
        "https://127.0.0.1:8123/files/a.png",
        "https://user@replicate.delivery/a.png",
        "data:image/png;base64,AAAA",
    ):
        with pytest.raises(BackendFailed, match="outside its delivery hosts"):
            gate.check_output(bad)
    for entry in ("https://x.example/path", "ftp://x.example", "*.", "a/b", "h:1"):
        with pytest.raises(ValueError, match="output host"):
            _gate(entry)


def test_fal_urls_on_another_host_get_nothing_and_the_request_is_cancelled(fal: FakeFal, recorder: Recorder) -> None:
    """The credential-leak reproduction: fal's answer names another server for status, result and cancel."""
    fal.faults.processing_s = 30
    fal.urls_base = recorder.url

    async def run() -> None:
        async with httpx.AsyncClient() as client:
            backend = FalBackend(
                client, key=fal.key, apps={"fast": "fal-ai/hidream-i1-fast"}, base_url=fal.url, output_hosts=[fal.url]
            )
            await backend.generate(JOB, timeout=10)

    with pytest.raises(BackendFailed, match="outside its API host"):
        asyncio.run(run())
    assert recorder.requests == []  # not one request, so certainly no "Authorization: Key ..."
    [request_id] = fal.requests
    status = httpx.get(
        f"{fal.url}/fal-ai/hidream-i1-fast/requests/{request_id}/status", headers={"Authorization": f"Key {fal.key}"}
    ).json()
    assert status["error_type"] == "request_cancelled"  # cancelled on the real API host: it stops billing


def _replicate(client: httpx.AsyncClient, fake: FakeReplicate, **kwargs: Any) -> ReplicateBackend:
    models = {"fast": "prunaai/hidream-l1-fast"}
    return ReplicateBackend(client, token=fake.token, models=models, base_url=fake.url, poll_seconds=0.02, **kwargs)


def _generate(fake: FakeReplicate, **kwargs: Any) -> Any:
    async def run() -> Any:
        # The gateway's own client: its downloads go to aiohttp past httpx's client layer (AiohttpClient.send).
        async with AiohttpClient(timeout=httpx.Timeout(30.0, connect=5.0)) as client:
            return await _replicate(client, fake, **kwargs).generate(JOB, timeout=10)

    return asyncio.run(run())


def test_replicate_polls_its_own_api_host_whatever_urls_an_answer_names(
    replicate: FakeReplicate, recorder: Recorder
) -> None:
    replicate.urls_base = recorder.url
    result = _generate(replicate, output_hosts=[replicate.url])
    assert result.width == 1024 and recorder.requests == []


@pytest.mark.parametrize(
    "allowed",
    [
        lambda rec: [f"http://127.0.0.1:{rec.server.port + 1}"],  # another port
        lambda rec: ["http://localhost:" + str(rec.server.port)],  # another host
        lambda rec: ["127.0.0.1", "*.replicate.delivery"],  # https only, and this output is plain http
    ],
)
def test_replicate_outputs_off_the_delivery_hosts_are_not_fetched(
    replicate: FakeReplicate, recorder: Recorder, allowed: Any
) -> None:
    replicate.output_base = recorder.url
    with pytest.raises(BackendFailed, match="outside its delivery hosts"):
        _generate(replicate, output_hosts=allowed(recorder))
    assert recorder.requests == []


def test_outputs_come_without_credentials(replicate: FakeReplicate, recorder: Recorder) -> None:
    replicate.output_base = recorder.url
    recorder.body = make_image(1024, 1024, "png")
    result = _generate(replicate, output_hosts=[recorder.url])
    assert result.images == [recorder.body]
    [download] = recorder.requests
    assert "authorization" not in download["headers"] and "cookie" not in download["headers"]


@pytest.mark.parametrize("chunks", [0, 20], ids=["content-length", "chunked"])
def test_an_output_over_the_byte_cap_fails_the_job(replicate: FakeReplicate, recorder: Recorder, chunks: int) -> None:
    replicate.output_base = recorder.url
    recorder.body, recorder.chunks = b"x" * (4096 if chunks == 0 else 1000), chunks
    with pytest.raises(BackendFailed, match="larger than 4000 bytes"):
        _generate(replicate, output_hosts=[recorder.url], max_bytes=4000)


def test_a_download_slower_than_its_timeout_fails_the_job(replicate: FakeReplicate, recorder: Recorder) -> None:
    replicate.output_base = recorder.url
    recorder.body, recorder.chunks, recorder.chunk_delay = b"x" * 100, 50, 0.1
    with pytest.raises(BackendFailed, match=r"longer than 0\.5 s"):
        _generate(replicate, output_hosts=[recorder.url], output_timeout=0.5)


def test_an_output_url_that_redirects_is_not_followed(replicate: FakeReplicate, recorder: Recorder) -> None:
    replicate.output_base = recorder.url
    recorder.status, recorder.headers = 302, {"Location": f"{replicate.url}/v1/predictions"}
    with pytest.raises(BackendFailed, match="answered 302"):
        _generate(replicate, output_hosts=[recorder.url])


# --- Settings ---


def test_settings_defaults_are_the_documented_delivery_hosts_and_parse_csv(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    assert defaults.replicate_output_hosts == list(replicate_backend.OUTPUT_HOSTS)
    assert defaults.fal_output_hosts == list(fal_backend.OUTPUT_HOSTS)
    assert (defaults.webhook_allowed_networks, defaults.output_max_bytes) == ([], 32 << 20)
    monkeypatch.setenv("HDG_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8, 127.0.0.1,fd00::/8")
    monkeypatch.setenv("HDG_FAL_OUTPUT_HOSTS", "fal.media,http://127.0.0.1:8123")
    configured = Settings()
    assert configured.webhook_allowed_networks == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]
    assert configured.fal_output_hosts == ["fal.media", "http://127.0.0.1:8123"]
    monkeypatch.setenv("HDG_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8,intranet")
    with pytest.raises(ValidationError, match="'intranet' is not a network in CIDR form"):
        Settings()


def test_unsafe_url_renders_as_a_client_error() -> None:
    body = UnsafeUrl("The webhook URL must use http or https.").body()
    assert json.loads(json.dumps(body))["error"] == {
        "message": "The webhook URL must use http or https.",
        "type": "invalid_request_error",
        "param": "webhook",
        "code": "unsafe_url",
    }


def test_a_url_with_whitespace_a_control_or_a_backslash_anywhere_is_never_fetched() -> None:
    # Parsers disagree on these (one strips a tab, another splits at it), so the gate refuses them outright. Every
    # code point Python counts as whitespace is one of them, Unicode's too, and every control character.
    gate = ProviderGate(
        "replicate", api_base="https://api.replicate.com", output_hosts=["replicate.delivery"], max_bytes=1, timeout=1
    )
    assert gate.check_output("https://replicate.delivery/a.png").host == "replicate.delivery"
    refused = [chr(i) for i in range(0x110000) if chr(i).isspace() or i < 0x20 or i == 0x7F] + ["\\"]
    assert len(refused) > 50
    for c in refused:
        with pytest.raises(BackendFailed):
            gate.check_output(f"https://replicate.delivery/a{c}b.png")
        with pytest.raises(BackendFailed):
            gate.api_url(f"https://api.replicate.com/v1/predictions/{c}x")
