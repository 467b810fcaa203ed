"""The egress guard: where an outgoing notification may connect.

A webhook URL is typed by people (tenant admins included), so it must not reach the machine's
own services or its private network: loopback, link-local (cloud metadata at 169.254.169.254),
private, shared, multicast, reserved and unspecified addresses are refused, in every spelling
(IPv4-mapped IPv6, decimal or hex IPv4), unless an operator's allowlist names the network.
The check runs when the connection is made, on the addresses actually connected to, so a name
that resolves differently a second time (DNS rebinding) gains nothing. No Django import.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from updates.engine.protocols import HttpSend

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressRefused(Exception):
    """The destination is not one a notification may reach. Not retryable."""


@dataclass(frozen=True)
class EgressPolicy:
    """Public addresses only, plus the networks an operator allowed explicitly."""

    allow: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, networks: Iterable[str]) -> EgressPolicy:
        """`networks`: addresses or CIDRs ("127.0.0.1", "10.0.0.0/8"). A bad entry raises
        ValueError naming it (settings turn that into ImproperlyConfigured)."""
        parsed = []
        for entry in networks:
            text = entry.strip()
            if not text:
                continue
            try:
                parsed.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"not an address or network: {text!r}") from None
        return cls(allow=tuple(parsed))

    def refusal(self, address: IPAddress) -> str | None:
        """Why `address` may not be reached, or None when it may."""
        plain = _unmapped(address)
        if any(plain in network for network in self.allow if network.version == plain.version):
            return None
        if plain.is_multicast:
            return "a multicast address"
        if plain.is_loopback:
            return "a loopback address"
        if plain.is_link_local:
            return "a link-local address"
        if plain.is_unspecified:
            return "the unspecified address"
        if not plain.is_global:
            return "a private or reserved address"
        return None

    def check_host(self, host: str) -> None:
        """Refuse a URL host that is a forbidden address literal (names are checked at connect)."""
        address = _literal(host)
        if address is not None:
            reason = self.refusal(address)
            if reason:
                raise EgressRefused(f"{host} is {reason}")

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """Resolve `host`, refuse if any address is forbidden, connect to an allowed one."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise EgressRefused(f"{host} does not resolve ({err.strerror})") from None
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            reason = self.refusal(address)
            if reason:
                # One forbidden answer refuses the name: a rebinding name mixes its answers.
                raise EgressRefused(f"{host} resolves to {address}, {reason}")
        last_error: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
            except OSError as err:
                sock.close()
                last_error = err
                continue
            return sock
        raise last_error or OSError(f"{host}: no address to connect to")


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address.teredo is not None:
            return address.teredo[1]
    return address


def _literal(host: str) -> IPAddress | None:
    """`host` as an address when it is one in any spelling the resolver accepts
    (dotted, decimal 2130706433, hex 0x7f000001, bracketed IPv6)."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def check_url(url: str, policy: EgressPolicy, *, allow_http: bool) -> None:
    """The URL's form: http(s) only (https unless allowed), a host, no forbidden literal."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port
    except ValueError as err:
        raise EgressRefused(f"not a valid URL: {err}") from None
    schemes = {"https", "http"} if allow_http else {"https"}
    if parts.scheme not in schemes:
        raise EgressRefused(f"scheme {parts.scheme or '(none)'!r} is not allowed")
    if not host:
        raise EgressRefused("the URL names no host")
    policy.check_host(host)


def _pool_classes(policy: EgressPolicy) -> dict[str, type[HTTPConnectionPool]]:
    """urllib3 pools whose connections go through `policy.connect`."""

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return policy.connect(self._dns_host, self.port, _seconds(self.timeout))

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return policy.connect(self._dns_host, self.port, _seconds(self.timeout))

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}


def _seconds(timeout: Any) -> float | None:
    return float(timeout) if isinstance(timeout, int | float) else None


class GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: EgressPolicy) -> None:
        self._policy = policy
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _pool_classes(self._policy)


def guarded_send(*, timeout: float, policy: EgressPolicy, allow_http: bool = False) -> HttpSend:
    """POST through the guard. Redirects are never followed (a 3xx is the answer), and
    proxies from the environment are ignored (they would hide the real destination)."""

    def send(
        url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[int, Mapping[str, str], bytes]:
        check_url(url, policy, allow_http=allow_http)
        with requests.Session() as session:
            session.trust_env = False
            adapter = GuardedAdapter(policy)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            response = session.post(
                url,
                data=body,
                headers=dict(headers),
                timeout=(min(timeout, 3.0), timeout),
                allow_redirects=False,
            )
            return response.status_code, dict(response.headers), response.content[:4096]

    return send
