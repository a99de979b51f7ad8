"""The socket side of a zero-downtime hand-over: two listeners share the port, the newest takes every
new connection, and closing the old one resets nobody (the kernel behaviour local_deploy relies on)."""

from __future__ import annotations

import socket
import sys

import pytest

from conftest import free_port
from finetune_phi.endpoint.__main__ import bind_socket, steer_new_connections

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reuseport steering is Linux-only")

CLIENTS = 64


def _listener(port: int) -> socket.socket:
    sock = bind_socket("127.0.0.1", port)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _accept_all(sock: socket.socket) -> list[socket.socket]:
    accepted = []
    while True:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return accepted
        accepted.append(conn)


def _connect_clients(port: int) -> list[socket.socket]:
    clients = []
    for _ in range(CLIENTS):
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        clients.append(client)
    return clients


def _closed_by_peer(client: socket.socket) -> bool:
    """True when the server side has reset or closed the connection (a reset arrives at once on loopback)."""
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def test_without_steering_closing_the_old_listener_resets_its_queued_connections() -> None:
    """The failure the steering exists for: the kernel hashes clients over both listeners."""
    port = free_port()
    old, new = _listener(port), _listener(port)
    clients = _connect_clients(port)
    old.close()  # as uvicorn does on SIGTERM, without accepting what is queued
    served = _accept_all(new)
    try:
        assert 0 < len(served) < CLIENTS  # some went to each listener
        assert sum(_closed_by_peer(c) for c in clients) == CLIENTS - len(served)
    finally:
        for s in clients + served:
            s.close()
        new.close()


def test_with_steering_the_newest_listener_takes_every_new_connection() -> None:
    port = free_port()
    old = _listener(port)
    early = _connect_clients(port)  # before the hand-over: all of them are the old server's
    new = _listener(port)
    assert steer_new_connections(new)
    late = _connect_clients(port)
    served_by_old = _accept_all(old)
    served_by_new = _accept_all(new)
    try:
        assert len(served_by_old) == CLIENTS and len(served_by_new) == CLIENTS
        old.close()
        # Nothing was left in the old queue, so nobody is reset; the steering stays with the group
        # and, alone, the new listener takes everything by the kernel's fallback.
        assert not any(_closed_by_peer(c) for c in late)
        after = _connect_clients(port)
        assert len(_accept_all(new)) == CLIENTS
        for c in after:
            c.close()
    finally:
        for s in early + late + served_by_old + served_by_new:
            s.close()
        new.close()


def test_steering_a_lone_listener_falls_back_to_the_kernel_hash() -> None:
    port = free_port()
    alone = _listener(port)
    assert steer_new_connections(alone)  # index 1 does not exist yet: the kernel hashes over one socket
    clients = _connect_clients(port)
    try:
        assert len(_accept_all(alone)) == CLIENTS
    finally:
        for c in clients:
            c.close()
        alone.close()
