"""Where the service listens: a host and port checked before the model loads, so that a busy port is one line
at once, and whether a host is private to this machine."""

from __future__ import annotations

import ipaddress
import socket

from geoswc.core.errors import InputError


def check_bindable(host: str, port: int) -> None:
    """Refuse a host this machine cannot listen on, or a port something else holds."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as e:  # socket.gaierror included
        raise InputError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --host or --port, or stop what uses it"
        ) from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (a service there needs no token to be private)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
