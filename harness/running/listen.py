"""Rendezvous stores that listen only where they serve.

``TCPStore(host, port, ..., is_master=True)`` does not bind to ``host``: its
server listens on every interface, IPv4 and IPv6 (``*:PORT``), unauthenticated,
for as long as it lives.  Here the listening socket is made first, bound to
the one address the store serves, and handed to the store
(``master_listen_fd``), which then accepts only there:

* a single-node cell's ranks meet on the loopback interface (127.0.0.1);
* a multi-node grid's store listens on the interface of ``--master-addr``.

Example::

    store, where = bound_store("127.0.0.1", 0, world_size=2)
    where  # {"bind": "127.0.0.1", "port": 41877}
"""

from __future__ import annotations

import socket
from datetime import timedelta

LOOPBACK = "127.0.0.1"


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host``'s address only (``port`` 0: the kernel picks one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # A port of a cell that just ended may linger in TIME_WAIT; the fixed --master-port must still bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def bound_store(host: str, port: int, world_size: int | None, timeout_s: float = 300.0):
    """A server ``TCPStore`` listening on ``host`` only; returns it and ``{"bind": ADDRESS, "port": PORT}``."""
    from torch.distributed import TCPStore  # torch is imported where a store is hosted, not by every command

    sock = listening_socket(host, port)
    bind, bound_port = sock.getsockname()[:2]
    try:
        # libuv's server accepts on the socket it is given (the older backend may not).
        store = TCPStore(host, bound_port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                         master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now and closes it with itself
    return store, {"bind": bind, "port": bound_port}
