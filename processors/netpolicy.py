"""Which http(s) URLs may be fetched, and at which address: the server-side request forgery guard.

The URL is parsed once here; the host it names is resolved once; the fetcher connects to
exactly the address this module approved and sends the host name it approved as SNI and
Host header. Nothing downstream re-parses the URL, so a parser disagreement (a backslash,
userinfo, odd numeric IP forms) cannot send the request somewhere the check did not see.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from processors.config import MediaConfig
from processors.errors import MediaFetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# resolver(host, port) -> the host's addresses as strings; tests stub it, so no DNS is used.
Resolver = Callable[[str, int], Sequence[str]]

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# Characters the C inet_aton accepts in its numeric forms (decimal, octal, hex, 1-4 parts).
_NUMERIC_HOST = re.compile(r"^[0-9a-fx.]+$")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class FetchTarget:
    """An approved http(s) request target: where to connect and what to ask for."""

    scheme: str  # "http" or "https"
    host: str  # normalized host name (no trailing dot), or canonical IP text
    port: int
    address: str  # the resolved IP the connection must use
    request_target: str  # path + query sent on the request line
    host_header: str  # Host header value (host, plus port when not the default)


def system_resolver(host: str, port: int) -> list[str]:
    """Resolve `host` with the operating system's resolver (getaddrinfo)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public_address(ip: IPAddress) -> bool:
    """Whether `ip` is a globally routable unicast address, embedded IPv4 forms unwrapped.

    Loopback, private (RFC 1918, unique-local), site-local, link-local (incl. cloud
    metadata at 169.254.169.254), carrier-grade NAT, unspecified, multicast and reserved ranges are
    not public. IPv4-mapped, NAT64, 6to4 and Teredo IPv6 forms are judged by the IPv4
    address they carry.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if embedded:
            return all(is_public_address(v4) for v4 in embedded)
    return (
        ip.is_global
        and not ip.is_multicast
        and not ip.is_reserved
        and not ip.is_unspecified
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_private
        # fec0::/10, deprecated site-local: Python counts it global, routers still don't
        and not (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local)
    )


def host_in_allowlist(host: str, allowed_domains: Sequence[str]) -> bool:
    """Whether the normalized `host` is named by the domain allowlist."""
    for entry in allowed_domains:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("*."):
            entry = entry[1:]
        if entry.startswith("."):
            if host == entry[1:] or host.endswith(entry):
                return True
        elif host == _canonical_allow_entry(entry):
            return True
    return False


def _canonical_allow_entry(entry: str) -> str:
    # "[::1]" and "::1" both name the same IPv6 literal; compare canonical text.
    try:
        return str(ipaddress.ip_address(entry.strip("[]")))
    except ValueError:
        return entry


def _refuse(reason: str) -> MediaFetchError:
    return MediaFetchError(f"Media URL refused: {reason}.")


def _split_url(url: str) -> SplitResult:
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in url):
        raise _refuse("it contains whitespace, control or non-ASCII characters")
    if "\\" in url:
        # Browsers read "\" as "/", Python's parser does not: refuse the ambiguity outright.
        raise _refuse("it contains a backslash")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _refuse("it is not a valid URL") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise _refuse("only http and https URLs can be fetched from the network")
    if "@" in parts.netloc:
        raise _refuse("URLs with user information ('user@host') are not accepted")
    if not parts.netloc:
        raise _refuse("it has no host")
    return parts


def _parse_host(parts: SplitResult) -> tuple[str, IPAddress | None]:
    """Return (normalized host text, IP if the host is an IP literal)."""
    raw = parts.hostname or ""
    if "[" in parts.netloc:
        try:
            ip6 = ipaddress.IPv6Address(raw)
        except ValueError:
            raise _refuse("the bracketed host is not a valid IPv6 address") from None
        if ip6.scope_id:
            raise _refuse("IPv6 zone identifiers are not accepted")
        return str(ip6), ip6
    host = raw[:-1] if raw.endswith(".") else raw  # one trailing dot names the same host
    if not host or len(host) > 253:
        raise _refuse("the host name is empty or too long")
    if _NUMERIC_HOST.match(host) and _inet_aton_accepts(host):
        try:
            ip4 = ipaddress.IPv4Address(host)
        except ValueError:
            # Decimal, octal, hex or short forms ("2130706433", "0177.0.0.1", "0x7f.1"):
            # resolvers disagree about them, so only canonical dotted quads are accepted.
            raise _refuse("numeric hosts must be written as a dotted-quad IPv4 address") from None
        return str(ip4), ip4
    if not all(_LABEL.match(label) for label in host.split(".")):
        raise _refuse("the host name is not a valid DNS name")
    return host, None


def _inet_aton_accepts(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def check_url(url: str, config: MediaConfig, resolver: Resolver | None = None) -> FetchTarget:
    """Parse, check and resolve an http(s) URL once, returning the address to connect to.

    Args:
        url: The URL as the client sent it.
        config: Allowlists and the private-network switch.
        resolver: Host name resolver; defaults to the system resolver.

    Returns:
        The approved target; connect to `target.address` and nowhere else.

    Raises:
        MediaFetchError: (400) the URL is malformed, ambiguous or not allowed, or its host
            resolves to a forbidden address or not at all.
    """
    parts = _split_url(url)
    host, literal_ip = _parse_host(parts)
    try:
        port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise _refuse("the port is not valid") from None
    if port == 0:  # urlsplit gives 0 for ":0", which `or` silently turned into 80
        raise _refuse("the port is not valid")

    allowlisted = host_in_allowlist(host, config.allowed_domains)
    if config.allowed_domains and not allowlisted:
        raise _refuse("the host is not in the allowed domain list")

    if literal_ip is not None:
        addresses: list[IPAddress] = [literal_ip]
    else:
        try:
            resolved = list((resolver or system_resolver)(host, port))
        except (OSError, UnicodeError):
            raise MediaFetchError(
                "Media URL could not be fetched: the host name did not resolve."
            ) from None
        try:
            addresses = [ipaddress.ip_address(text) for text in resolved]
        except ValueError:
            raise MediaFetchError(
                "Media URL could not be fetched: the host name did not resolve."
            ) from None
        if not addresses:
            raise MediaFetchError("Media URL could not be fetched: the host name did not resolve.")

    # Every address must be public, not just the first: a resolver may reorder them.
    public = all(is_public_address(ip) for ip in addresses)
    if not (public or allowlisted or config.allow_private_networks):
        raise _refuse("the host is a loopback, private, link-local or otherwise non-public address")

    default_port = _DEFAULT_PORTS[parts.scheme]
    host_text = f"[{host}]" if isinstance(literal_ip, ipaddress.IPv6Address) else host
    return FetchTarget(
        scheme=parts.scheme,
        host=host,
        port=port,
        address=str(addresses[0]),
        request_target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
        host_header=host_text if port == default_port else f"{host_text}:{port}",
    )
