"""Every URL the gateway fetches or posts to: which webhook addresses, provider hosts and output hosts are allowed.

Two gates, one per direction of trust:

- ``NetworkPolicy`` guards URLs a *client* chose (webhooks): only public addresses, checked after DNS, and the
  connection goes to the address that was checked.
- ``ProviderGate`` guards URLs a *provider* named: its credential only goes to its configured API host, and its
  outputs only come from its delivery hosts, capped in size and time, without any credential.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from gateway.errors import BackendFailed, InvalidRequest

log = logging.getLogger("hidream_gateway.outbound")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_CHARS = 2000
OUTPUT_MAX_BYTES = 32 << 20  # a 2048x2048 PNG is under 16 MiB; anything far bigger is not an image we asked for
OUTPUT_TIMEOUT_S = 60.0
DEFAULT_PORTS = {"http": 80, "https": 443}
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are an IPv4 address


RESPONSE_CAP = 64 << 10  # what is kept of a webhook receiver's answer


class UnsafeUrl(InvalidRequest):
    """A URL the gateway will not call: a bad shape, or an address that is not public."""

    code = "unsafe_url"

    def __init__(self, message: str, *, param: str | None = "webhook") -> None:
        super().__init__(message, param=param)


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in, so ``https://h`` and ``https://h:443`` compare equal."""
    return url.scheme, url.host.lower().rstrip("."), url.port or DEFAULT_PORTS.get(url.scheme, 0)


# A backslash, whitespace (\s is str.isspace(): Unicode's too) or a control character: parsers disagree on these.
_UNSAFE = re.compile(r"[\\\s\x00-\x1f\x7f]")


def _parse(url: str) -> httpx.URL | None:
    """The URL as httpx (which will send it) reads it, or None when it has a shape that parsers disagree on."""
    if len(url) > MAX_URL_CHARS or _UNSAFE.search(url):
        return None
    try:
        parsed = httpx.URL(url)
        _ = parsed.host  # an invalid IDNA label (``xn--``) only fails when the host is decoded
        return parsed
    except (httpx.InvalidURL, UnicodeError):
        return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one wraps (mapped, 6to4 or NAT64), which is where packets really go."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: IPAddress) -> bool:
    """True only for a global unicast address: not loopback, private, link-local, shared, reserved or multicast."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public(embedded)
        if ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks
            return False
    # is_global alone lets multicast (224/4, ff0e::) and some reserved blocks through, so each is refused by name.
    return ip.is_global and not (
        ip.is_multicast or ip.is_reserved or ip.is_private or ip.is_link_local or ip.is_loopback or ip.is_unspecified
    )


class NetworkPolicy:
    """Which addresses outbound webhook posts may reach.

    Example::

        policy = NetworkPolicy(allowed_networks=["10.0.0.0/8"])
        policy.check_syntax(webhook)                       # when the prediction is created: cheap, no DNS
        resp = await policy.post(client, webhook, content=body, headers=signed, timeout=10)

    ``allowed_networks`` are CIDRs let through although not public (an operator's own hooks on a private network).
    """

    def __init__(self, allowed_networks: Sequence[str] = ()) -> None:
        self.allowed = tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks)

    def check_syntax(self, url: str) -> None:
        """Refuse a URL that is not plain http(s) to a named host: no credentials in it, a sane port and length."""
        parsed = _parse(url)
        if parsed is None:
            raise UnsafeUrl(f"The webhook URL is not a valid URL of at most {MAX_URL_CHARS} characters.")
        if parsed.scheme not in DEFAULT_PORTS:
            raise UnsafeUrl("The webhook URL must use http or https.")
        if not parsed.host:
            raise UnsafeUrl("The webhook URL has no host.")
        if parsed.userinfo:
            raise UnsafeUrl("The webhook URL must not carry a user name or password.")
        if parsed.port is not None and not 1 <= parsed.port <= 65535:
            raise UnsafeUrl("The webhook URL has an invalid port.")

    def allows(self, ip: IPAddress) -> bool:
        """True if a webhook may reach ``ip``: it is public, or inside one of the allowed networks."""
        candidates = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
            candidates.append(embedded)
        if any(c in net for c in candidates for net in self.allowed):
            return True
        return is_public(ip)

    async def resolve(self, url: str) -> list[str]:
        """The addresses ``url``'s host resolves to, all of them allowed; UnsafeUrl if any one is not."""
        self.check_syntax(url)
        parsed = httpx.URL(url)
        host = parsed.host
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            addresses = await self._lookup(host, parsed.port or DEFAULT_PORTS[parsed.scheme])
        # One refused address refuses the host: a name that also points inside is a rebinding attempt or a mistake.
        for ip in addresses:
            if not self.allows(ip):
                raise UnsafeUrl(f"The webhook host {host} resolves to {ip}, which is not a public address.")
        return [str(ip) for ip in addresses]

    async def _lookup(self, host: str, port: int) -> list[IPAddress]:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise UnsafeUrl(f"The webhook host {host} cannot be resolved.") from exc
        found: list[IPAddress] = []
        for info in infos:
            try:
                ip = ipaddress.ip_address(str(info[4][0]))
            except ValueError:
                continue
            if ip not in found:
                found.append(ip)
        if not found:
            raise UnsafeUrl(f"The webhook host {host} cannot be resolved.")
        return found

    async def post(
        self, client: httpx.AsyncClient, url: str, *, content: bytes, headers: dict[str, str], timeout: float
    ) -> httpx.Response:
        """POST to ``url`` by way of an address that was checked; redirects are returned, never followed.

        The request goes to the checked IP with the original Host header (and, over TLS, the original name for SNI
        and certificate checks), so a DNS answer that changes between check and connect cannot redirect it.
        Transport errors propagate as httpx errors: the caller decides whether to retry.
        """
        ips = await self.resolve(url)
        target = httpx.URL(url)
        sent = {k: v for k, v in headers.items() if k.lower() != "host"} | {"Host": target.netloc.decode("ascii")}
        extensions = {}
        if target.scheme == "https":
            extensions["sni_hostname"] = target.host
            # A pooled TLS connection is keyed by the IP only, so another name on the same IP could reuse this one's
            # certificate check; closing after each post keeps one name per connection.
            sent["Connection"] = "close"

        def to(ip: str) -> httpx.Request:
            return client.build_request(
                "POST", target.copy_with(host=ip), content=content, headers=sent, timeout=timeout, extensions=extensions
            )

        async def send(request: httpx.Request) -> httpx.Response:
            # Streamed, and at most RESPONSE_CAP bytes kept: a receiver must not be able to fill our memory.
            resp = await client.send(request, stream=True, follow_redirects=False)
            body = b""
            try:
                async for chunk in resp.aiter_raw():
                    body += chunk
                    if len(body) >= RESPONSE_CAP:
                        break
            except httpx.StreamConsumed:  # a transport that answered with the whole body already read
                body = resp.content
            finally:
                await resp.aclose()
            return httpx.Response(resp.status_code, headers=resp.headers, content=body[:RESPONSE_CAP], request=request)

        for ip in ips[:-1]:  # every address was checked, so any of them will do
            try:
                return await send(to(ip))
            except httpx.ConnectError:
                log.info("webhook address %s refused the connection; trying the next one", ip)
        return await send(to(ips[-1]))


@dataclass(frozen=True)
class _HostRule:
    scheme: str
    host: str
    port: int
    subdomains: bool  # "*.example.com": any name under example.com, not example.com itself

    @classmethod
    def parse(cls, entry: str) -> _HostRule:
        """``host``, ``*.host`` (https on 443) or an explicit origin ``scheme://host[:port]``."""
        if "://" in entry:
            url = httpx.URL(entry)
            if url.scheme not in DEFAULT_PORTS or not url.host or url.userinfo or url.path not in ("", "/"):
                raise ValueError(f"output host {entry!r} is not an origin such as http://127.0.0.1:8123")
            return cls(*_origin(url), subdomains=False)
        wildcard = entry.startswith("*.")
        host = entry.removeprefix("*.").lower().rstrip(".")
        if not host or any(c in host for c in "/:@*"):
            raise ValueError(f"output host {entry!r} is not a host name such as replicate.delivery")
        return cls("https", host, 443, subdomains=wildcard)

    def matches(self, origin: tuple[str, str, int]) -> bool:
        scheme, host, port = origin
        if (scheme, port) != (self.scheme, self.port):
            return False
        return host.endswith(f".{self.host}") if self.subdomains else host == self.host


class ProviderGate:
    """Where one provider's credentials may go and where its outputs may come from.

    Example::

        gate = ProviderGate("replicate", api_base="https://api.replicate.com",
                            output_hosts=["replicate.delivery", "*.replicate.delivery"],
                            max_bytes=32 << 20, timeout=60)
        await client.get(gate.api_url(poll_url), headers=auth)   # BackendFailed unless on the API host
        blob = await gate.download(client, output_url)            # BackendFailed unless from a delivery host
    """

    def __init__(
        self, name: str, *, api_base: str, output_hosts: Sequence[str], max_bytes: int, timeout: float
    ) -> None:
        self.name = name
        self.api_origin = _origin(httpx.URL(api_base))
        self.output_rules = tuple(_HostRule.parse(entry) for entry in output_hosts)
        self.max_bytes = max_bytes
        self.timeout = timeout

    def api_url(self, url: str) -> str:
        """``url`` if it is on the configured API host (same scheme, host and port), else BackendFailed."""
        parsed = _parse(url)
        if parsed is None or parsed.userinfo or _origin(parsed) != self.api_origin:
            raise BackendFailed(f"{self.name} named a URL outside its API host; not sent.")
        return url

    def check_output(self, url: str) -> httpx.URL:
        """The parsed ``url`` if it is on one of the provider's delivery hosts, else BackendFailed."""
        parsed = _parse(url)
        if parsed is None or parsed.userinfo or not any(r.matches(_origin(parsed)) for r in self.output_rules):
            raise BackendFailed(f"{self.name} named an output URL outside its delivery hosts; not fetched.")
        return parsed

    async def download(self, client: httpx.AsyncClient, url: str) -> bytes:
        """Fetch one output: no credential, no redirects, at most ``max_bytes`` within ``timeout`` seconds."""
        parsed = self.check_output(url)
        request = client.build_request("GET", parsed, timeout=self.timeout)
        # Outputs are public: a client-wide credential or cookie must not travel to the delivery host.
        for header in ("authorization", "cookie"):
            request.headers.pop(header, None)

        async def once() -> bytes:
            resp = await client.send(request, auth=None, follow_redirects=False, stream=True)
            try:
                return await self._read(resp)
            finally:
                await resp.aclose()

        try:
            async with asyncio.timeout(self.timeout):
                try:
                    return await once()
                except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError):
                    return await once()  # once more: a reused connection the host had just closed
        except TimeoutError as exc:
            raise BackendFailed(f"{self.name}'s output took longer than {self.timeout:g} s to download.") from exc
        except httpx.HTTPError as exc:
            raise BackendFailed(f"{self.name}'s output could not be downloaded ({type(exc).__name__}).") from exc

    async def _read(self, resp: httpx.Response) -> bytes:
        if resp.status_code != 200:
            raise BackendFailed(f"{self.name}'s output URL answered {resp.status_code}.")
        too_big = BackendFailed(f"{self.name}'s output is larger than {self.max_bytes} bytes; not kept.")
        length = resp.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        body = bytearray()
        async for chunk in resp.aiter_bytes():  # decoded bytes, so a compressed bomb is capped too
            body += chunk
            if len(body) > self.max_bytes:
                raise too_big
        return bytes(body)
