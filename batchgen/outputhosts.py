"""Which hosts outputs may be downloaded from, and which addresses a download may connect to.

RunComfy serves outputs from its storage hosts (``*.runcomfy.net``, ``*.runcomfy.com``: the only
hosts RunComfy's own CLI downloads from). The API's own host (a simulator, a development stack) and
the hosts a user lists in ``output_hosts`` (batchgen.toml) are allowed too; every other host is
refused before a connection is made. Otherwise an API answer, or a redirect on the way, could point
a download at a cloud machine's metadata service (169.254.169.254), at a service on loopback or the
private network, or at whatever a stranger serves.

A name is checked twice: the URL's host against the list (once per host: the verdict is cached),
and the addresses it resolves to, by the download session's resolver. The resolver is what the
connection uses, so the address checked is the address connected to: a name that resolves to a
public address when looked at and to 127.0.0.1 a moment later (DNS rebinding) gains nothing.
Loopback, link-local and private addresses are refused unless the API itself is on one (the
simulator on 127.0.0.1, a development stack on the local network). aiohttp caches what the
resolver returns (10 s), so this costs one lookup per host, not one per download.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from . import constants as C

HOW_TO_ALLOW = "add it to output_hosts in batchgen.toml to download from it"
# Verdicts kept per (scheme, host): a batch has a handful of hosts; the bound only stops a hostile
# API from growing the cache with a new host name per output.
_MAX_VERDICTS = 1024


class AddressRefused(OSError):
    """A host resolved only to addresses a download may not connect to."""


def not_public(address: str) -> bool:
    """True for loopback, link-local, private, unspecified, reserved and multicast addresses (and
    anything unreadable): the ones a download reaches only when the API itself is on one."""
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])  # an IPv6 scope (fe80::1%eth0) aside
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return not ip.is_global or ip.is_multicast


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _normal(host: str | None) -> str:
    return (host or "").strip().lower().rstrip(".")


class OutputHosts:
    """The hosts outputs may come from, for an API at ``api_url`` and the user's ``extra`` hosts
    (exact names, or ``*.example.com`` for a domain and every name under it)."""

    def __init__(self, api_url: str, extra: Iterable[str] = ()):
        api = URL(api_url)
        self.api_host = _normal(api.host)
        # Plain http only when the API itself speaks it (a simulator, a local stack): an output
        # over http from the public internet could be swapped on the way.
        self._plain_http_ok = api.scheme == "http"
        self._exact = {self.api_host}
        suffixes = []
        for pattern in (*C.OUTPUT_HOSTS, *extra):
            p = _normal(pattern)
            if p.startswith("*."):
                suffixes.append(p[1:])  # ".runcomfy.net"
            elif p:
                self._exact.add(p)
        self._suffixes = tuple(suffixes)
        self._verdicts: dict[tuple[str, str], str | None] = {}
        # Whether the API is on a loopback/private address: known now for an address, looked up
        # once (on first need) for a name.
        self._api_private: bool | None = not_public(self.api_host) if _is_ip(self.api_host) else None

    def allowed_name(self, host: str) -> bool:
        # "." + host: "*.runcomfy.net" covers runcomfy.net itself too.
        return host in self._exact or ("." + host).endswith(self._suffixes)

    async def refusal(self, url: URL) -> str | None:
        """Why a download from ``url`` is refused, or None when it may go ahead."""
        key = (url.scheme, url.host or "")
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        verdict = await self._judge(url.scheme, _normal(url.host))
        if len(self._verdicts) < _MAX_VERDICTS:
            self._verdicts[key] = verdict
        return verdict

    async def _judge(self, scheme: str, host: str) -> str | None:
        if not self.allowed_name(host):
            return (f"output host '{host}' is not allowed (only RunComfy's storage hosts and the API's "
                    f"own host are); {HOW_TO_ALLOW}")
        if scheme != "https" and not (scheme == "http" and self._plain_http_ok):
            return f"output URL on '{host}' is not https; refused"
        # A literal address is never looked up, so the resolver below never sees it: judged here.
        if _is_ip(host) and host != self.api_host and not_public(host) and not await self.api_is_private():
            return f"output host '{host}' is a loopback, link-local or private address; refused"
        return None

    async def api_is_private(self) -> bool:
        if self._api_private is None:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(self.api_host, None,
                                                                     type=socket.SOCK_STREAM)
                self._api_private = any(not_public(str(info[4][0])) for info in infos)
            except OSError:
                self._api_private = False  # cannot tell: the strict answer
        return self._api_private

    def resolver(self, inner: AbstractResolver | None = None) -> AbstractResolver:
        """The resolver a download session connects through (``inner``: the real lookup; the
        system's resolver, getaddrinfo, by default, as aiohttp's own default does)."""
        return _GuardedResolver(self, inner or ThreadedResolver())


class _GuardedResolver(AbstractResolver):
    """Resolves as ``inner`` does, then drops the addresses a download may not connect to."""

    def __init__(self, hosts: OutputHosts, inner: AbstractResolver):
        self._hosts = hosts
        self._inner = inner

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        if _normal(host) == self._hosts.api_host:
            return found  # wherever the API is, its own outputs may be fetched from there
        allowed = [r for r in found if not not_public(r["host"])]
        if len(allowed) == len(found) or await self._hosts.api_is_private():
            return found
        if not allowed:
            raise AddressRefused(f"output host '{host}' resolves to {found[0]['host']}, a loopback, "
                                 "link-local or private address; refused")
        return allowed  # a name answering both kinds: only its public addresses are connected to

    async def close(self) -> None:
        await self._inner.close()
