"""
Transport of state updates from task supervisors to the coalescer, and of outcomes back.

The coalescer and the applier do not depend on this module: a transport only needs a function
``submit(update, deadline) -> Future[Outcome]`` on the receiving side and offers
:meth:`UpdateSender.send` on the sending side. This module implements the local case, where the
supervisors run in LocalExecutor worker processes on the scheduler's host: one Unix stream socket
served by the executor process, one connection per update, one JSON line each way. A remote transport
(for example a batch endpoint on the API server for Celery workers) implements the same two sides.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Protocol

from kestra_perf_provider.dagrun_batching.exceptions import TransportError
from kestra_perf_provider.dagrun_batching.updates import Outcome, StateUpdate

log = logging.getLogger(__name__)

Submit = Callable[[StateUpdate, float], "Future[Outcome]"]
"""``submit(update, deadline)``; ``deadline`` is a :func:`time.monotonic` value of the receiving process."""

# Largest request line: a success body with many outlet events and their extras stays far below it.
_MAX_LINE_BYTES = 16 * 1024 * 1024

# Extra seconds the sender waits past its timeout for the receiver's own fallback outcome.
_REPLY_GRACE_SECONDS = 2.0


class UpdateSender(Protocol):
    """Sending side of a transport, used in the process that supervises the task."""

    def send(self, update: StateUpdate, timeout: float) -> Outcome:
        """
        Hand ``update`` to the coalescer and wait for its outcome.

        :param timeout: seconds after which the receiver returns "fell back" if the update is not applied.
        :raises TransportError: the receiver cannot be reached or sent no outcome in time, so the caller
            sends the update through the stock API path.
        """


class UnixSocketSender:
    """
    Send updates to a :class:`UnixSocketReceiver` over its socket file.

    :param path: path of the receiver's socket file.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def send(self, update: StateUpdate, timeout: float) -> Outcome:
        request = json.dumps({"timeout": float(timeout), "update": update.to_dict()}).encode() + b"\n"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout + _REPLY_GRACE_SECONDS)
            sock.connect(self.path)
            sock.sendall(request)
            reply = _read_line(sock)
        except (OSError, ValueError) as err:
            # A missing socket file, a refused connection and EOF all mean the executor process is gone
            # or stopping; a timeout means it is too busy. Either way the stock path takes over.
            raise TransportError(
                f"No outcome from the DAG-run batching socket {self.path} for ti_id={update.ti_id}: {err!r}"
            ) from err
        finally:
            sock.close()
        try:
            return Outcome.from_json(reply)
        except (ValueError, KeyError) as err:
            raise TransportError(f"Invalid outcome {reply[:200]!r} from {self.path}: {err!r}") from err


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the receiver closed the connection before answering")
        newline = chunk.find(b"\n")
        if newline >= 0:
            chunks.append(chunk[:newline])
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > _MAX_LINE_BYTES:
            raise ValueError(f"line longer than {_MAX_LINE_BYTES} bytes")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.server.track(self.connection)
        try:
            line = self.rfile.readline(_MAX_LINE_BYTES + 1)
            if not line.endswith(b"\n"):
                log.warning("Dropped a truncated batching request of %d bytes", len(line))
                return
            request = json.loads(line)
            timeout = float(request["timeout"])
            update = StateUpdate.from_dict(request["update"])
            outcome = self.server.wait_for_outcome(update, timeout)
            self.wfile.write(outcome.to_json().encode() + b"\n")
        except (ValueError, KeyError, TypeError) as err:
            log.warning("Dropped an invalid batching request: %r", err)
        except OSError as err:
            log.debug("Supervisor disconnected before its outcome was sent: %r", err)
        finally:
            self.server.untrack(self.connection)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128

    def __init__(self, path: str, submit: Submit) -> None:
        self._submit = submit
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(path, _Handler)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def wait_for_outcome(self, update: StateUpdate, timeout: float) -> Outcome:
        future = self._submit(update, time.monotonic() + timeout)
        try:
            return future.result(timeout)
        except FutureTimeoutError:
            # Withdraw the update if no group has taken it yet. A group already applying it may still
            # commit: the supervisor's stock request then finds the row in success and changes nothing.
            future.cancel()
            return Outcome.fell_back(f"not applied within {timeout} s")

    def close_in_child(self) -> None:
        """Close this process's copies of the listening and accepted sockets, after a fork."""
        for sock in [self.socket, *self._connections]:
            try:
                sock.close()
            except OSError:
                pass


# Receivers alive in this process. A process forked from the executor (a LocalExecutor worker that
# replaces a dead one) must not keep their sockets open. Otherwise a supervisor could connect to a
# socket whose owner died and wait for its whole timeout instead of falling back at once.
_LIVE_SERVERS: weakref.WeakSet[_Server] = weakref.WeakSet()


def _close_inherited_servers() -> None:
    for server in list(_LIVE_SERVERS):
        server.close_in_child()
    _LIVE_SERVERS.clear()


os.register_at_fork(after_in_child=_close_inherited_servers)


class UnixSocketReceiver:
    """
    Receive updates on a Unix socket file and pass each to ``submit``.

    :param path: socket file to create; it must not exist and is removed by :meth:`stop`.
    :param submit: the coalescer's ``submit``.
    """

    def __init__(self, path: str, submit: Submit) -> None:
        self.path = path
        self._submit = submit
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Create the socket file and serve it on a background thread."""
        self._server = _Server(self.path, self._submit)
        os.chmod(self.path, 0o600)
        _LIVE_SERVERS.add(self._server)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="dagrun-batching-receiver",
            daemon=True,
        )
        self._thread.start()

    def sender(self) -> UnixSocketSender:
        """Return the matching sender; it pickles, so it can be handed to a worker process."""
        return UnixSocketSender(self.path)

    def stop(self) -> None:
        """Stop accepting updates and remove the socket file."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        _LIVE_SERVERS.discard(self._server)
        self._server = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
