"""The client's address behind trusted proxies (``IDENTITY_TRUSTED_PROXIES``).

A request's peer is a proxy when its address is in one of the trusted networks; then the
client is read from ``X-Forwarded-For``, walked from the right as nginx's ``set_real_ip_from``
with ``real_ip_recursive on`` and uvicorn's ``--forwarded-allow-ips`` walk it: each proxy
appends the address it was reached from, so the rightmost entry that is no trusted proxy is
the client, and every entry to its left is the client's own claim, never read. Any other
peer is the client itself: its ``X-Forwarded-For`` is anyone's word.
"""

import functools
import ipaddress
import re
from collections.abc import Iterable

from identity_service import constants as c

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# What the client's address is called when the peer is a Unix socket and no proxy's word
# names it.
UNIX_PEER = "unix"
# The setting's value that trusts no peer.
OFF = "off"
# IPv4-mapped IPv6 addresses are read as IPv4: a network among them would never match.
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
# An entry may be quoted in a problem when it holds only what an address or network holds.
_SHOWABLE = re.compile(r"[0-9A-Fa-f.:/%\[\] ]{1,64}")


class TrustedProxies:
    """The networks whose peers are trusted proxies, and the client address each request
    has behind them (``client_ip``, cached: collect calls it for every AMP pageview).

    Built once from the settings; its caches are its own, so other networks (another
    application's settings) never get an answer computed for these. A Unix socket peer is
    trusted unless no network is (the setting's ``off``): only the host's own processes
    reach it.

    ``recursive``: walk past the entries of trusted proxies (networks the operator listed).
    The default list (every private network, ``IDENTITY_TRUSTED_PROXIES`` unset) reads the
    last entry alone, as before the setting: behind a load balancer that hands clients over
    from a private address (``externalTrafficPolicy: Cluster``'s SNAT) to an ingress that
    appends, every entry before it is the client's own claim, and walking past private
    entries there would let each client name its own counter.
    """

    __slots__ = ("_cached_client_ip", "_cached_trusts", "_v4", "_v6", "networks", "recursive")

    def __init__(self, networks: Iterable[Network], *, recursive: bool = True) -> None:
        self.networks = tuple(networks)
        self.recursive = recursive
        self._v4 = tuple(n for n in self.networks if isinstance(n, ipaddress.IPv4Network))
        self._v6 = tuple(n for n in self.networks if isinstance(n, ipaddress.IPv6Network))
        self._cached_client_ip = functools.lru_cache(maxsize=4096)(self._client_ip)
        self._cached_trusts = functools.lru_cache(maxsize=1024)(self._trusts)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, TrustedProxies)
            and self.networks == other.networks
            and self.recursive == other.recursive
        )

    def __hash__(self) -> int:
        return hash((self.networks, self.recursive))

    def __repr__(self) -> str:
        alone = "" if self.recursive else "; the last entry alone"
        return f"TrustedProxies({', '.join(map(str, self.networks)) or OFF}{alone})"

    def client_ip(self, peer: str | None, x_forwarded_for: str | None) -> str:
        """The client's address: the peer's, or, when the peer is a trusted proxy, the
        rightmost ``X-Forwarded-For`` entry that is no trusted proxy (all of them trusted:
        the leftmost read).

        ``peer`` is the connection's address, None for a Unix socket (then ``"unix"``
        when no entry names the client); ``x_forwarded_for`` every such field of the
        request, joined with commas. An entry may carry the client's port (``ip:port``,
        ``[ipv6]:port``). An entry that is no address ends the walk with the peer: such
        requests share the proxy's counter rather than name their own. At most
        ``MAX_FORWARDED_HOPS`` entries are read, from the right; one, the last, when not
        ``recursive``.
        """
        return self._cached_client_ip(peer, x_forwarded_for)

    def _client_ip(self, peer: str | None, x_forwarded_for: str | None) -> str:
        if peer is None:
            trusted, answer = bool(self.networks), UNIX_PEER
        else:
            trusted, answer = self._trusted_text(peer), peer
        if not trusted or not x_forwarded_for:
            return answer
        hops = c.MAX_FORWARDED_HOPS if self.recursive else 1
        entries = x_forwarded_for.rsplit(",", hops)[-hops:]
        client: Address | None = None
        for entry in reversed(entries):
            client = forwarded_address(entry.strip())
            if client is None:
                return answer
            if not self._cached_trusts(client):
                break
        return answer if client is None else str(client)

    def _trusted_text(self, peer: str) -> bool:
        address = parse_address(peer)
        return address is not None and self._cached_trusts(address)

    def _trusts(self, address: Address) -> bool:
        networks = self._v4 if isinstance(address, ipaddress.IPv4Address) else self._v6
        return any(address in network for network in networks)


def read_trusted_proxies(entries: list[str]) -> tuple[TrustedProxies | None, list[str]]:
    """The trusted proxies of the setting's ``entries`` (``["off"]``: none), or None and one
    problem per wrong entry, each naming the entry's position (from 1)."""
    if [entry.strip().lower() for entry in entries] == [OFF]:
        return TrustedProxies(()), []
    if not entries:
        return None, [f"lists no proxy: write {OFF} to trust none"]
    if len(entries) > c.MAX_TRUSTED_PROXIES:
        return None, [f"lists {len(entries)} entries, more than {c.MAX_TRUSTED_PROXIES}"]
    networks: list[Network] = []
    problems: list[str] = []
    for position, entry in enumerate(map(str.strip, entries), 1):
        network, problem = _network(entry)
        if network is not None:
            networks.append(network)
        else:  # quoted only when it holds nothing an address could not: no secret
            shown = f" ({entry})" if _SHOWABLE.fullmatch(entry) else ""
            problems.append(f"entry {position}{shown} {problem}")
    return (None if problems else TrustedProxies(networks)), problems


def _network(entry: str) -> tuple[Network | None, str]:
    """The network an entry names (an address is its own /32 or /128), or what is wrong
    with it, in words that follow the entry's name."""
    if not entry:
        return None, "is empty"
    if entry.lower() == OFF:
        return None, f"is {OFF}, which trusts no proxy only alone"
    try:
        network = ipaddress.ip_network(entry)
    except ValueError:
        try:
            loose = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return None, "is not an IP address or a CIDR network (10.0.0.0/8, fc00::/7)"
        return None, f"has host bits set: the network is {loose}"
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        return None, (
            "is an IPv4-mapped IPv6 network, which no address matches (they are "
            "read as IPv4): list it as IPv4"
        )
    return network, ""


def parse_address(text: str) -> Address | None:
    """The address ``text`` names, IPv4-mapped IPv6 addresses as IPv4, or None."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_address(entry: str) -> Address | None:
    """The address an ``X-Forwarded-For`` entry names, with or without the client's port
    (``203.0.113.7:50712``, ``[2001:db8::7]:50712``), as some proxies write it (Azure's
    Application Gateway): read as no address, every visitor shared the proxy's counter."""
    address = parse_address(entry)
    if address is None and entry.endswith(tuple("0123456789")):
        host, colon, port = entry.rpartition(":")
        if colon and port.isdigit() and len(port) <= 5:
            if host.startswith("[") and host.endswith("]"):
                address = parse_address(host[1:-1])
            elif "." in host:  # IPv4: an IPv6 address's last group is no port
                address = parse_address(host)
                address = address if isinstance(address, ipaddress.IPv4Address) else None
    return address


DEFAULT_TRUSTED_PROXIES = TrustedProxies(
    (ipaddress.ip_network(n) for n in c.DEFAULT_TRUSTED_PROXIES), recursive=False
)
