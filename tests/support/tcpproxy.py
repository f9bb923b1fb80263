"""A real TCP proxy on loopback that a test can cut and restore: a database outage on demand."""

from __future__ import annotations

import contextlib
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, held: bool = False) -> None:
        """`held`: listen but accept nothing until `release()`, so connects hang like a silent host."""
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._flowing = threading.Event()  # cleared by freeze(): bytes are held, connections stay open
        self._flowing.set()
        self.port = 0
        self.restore(held=held)

    def release(self) -> None:
        """Start accepting: connections waiting in the backlog go through to the target now."""
        assert self._listener is not None
        self._spawn(self._accept, self._listener)

    def restore(self, *, held: bool = False) -> None:
        """Listen (again, on the same port): new connections reach the target."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        if not held:
            self._spawn(self._accept, listener)

    def cut(self) -> None:
        """Close the listening socket and every proxied connection: connects are refused."""
        with self._lock:
            doomed, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        for sock in [listener, *doomed]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def freeze(self) -> None:
        """Stop relaying bytes both ways but keep every connection open, and accept new ones that
        hear nothing: a paused server or a network that drops packets (no refusal, no reset)."""
        self._flowing.clear()

    def thaw(self) -> None:
        """Relay again, held bytes first."""
        self._flowing.set()

    def close(self) -> None:
        self.cut()
        self._flowing.set()  # a pump holding bytes now finds its sockets closed and ends
        for thread in self._threads:
            thread.join(10)

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        thread = threading.Thread(target=target, args=args, name="proxy", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                self._flowing.wait()  # frozen: hold what came in, pass nothing on
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
