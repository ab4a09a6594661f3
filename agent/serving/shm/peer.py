"""Who is at the other end of a connection: SO_PEERCRED on a Unix socket, the socket's owner
in /proc/net/tcp{,6} for a loopback TCP client (the kernel's record, as identd reads it)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

_CRED = struct.Struct("3i")  # pid, uid, gid
PROC_NET = Path("/proc/net")


def unix_peer(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the process that connected a Unix socket, or None."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
    except OSError:
        return None
    pid, uid, _gid = _CRED.unpack(raw)
    return pid, uid


def _hex_address(host: str, port: int, family: int) -> str:
    """An address as /proc/net/tcp{,6} writes it (the kernel's words in host order)."""
    packed = socket.inet_pton(family, host)
    words = b"".join(packed[i : i + 4][::-1] for i in range(0, len(packed), 4))
    return f"{words.hex().upper()}:{port:04X}"


def socket_owner(table: str, local: str, remote: str) -> int | None:
    """The uid owning the socket whose local and remote addresses are given, from the text of
    a /proc/net/tcp{,6} table (pure)."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == local and fields[2] == remote:
            return int(fields[7])
    return None


def tcp_peer_uid(sock: socket.socket) -> int | None:
    """The uid owning the client's end of a TCP connection on this host, or None (not a
    local client, or the table cannot be read)."""
    try:
        family = sock.family
        ours = sock.getsockname()
        theirs = sock.getpeername()
    except OSError:
        return None
    name = "tcp6" if family == socket.AF_INET6 else "tcp"
    try:
        table = (PROC_NET / name).read_text()
    except OSError:
        return None
    # The client's socket: its local address is our peer's, its remote one ours.
    return socket_owner(
        table,
        _hex_address(theirs[0], theirs[1], family),
        _hex_address(ours[0], ours[1], family),
    )
