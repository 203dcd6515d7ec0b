"""A remote OIP teacher on 127.0.0.1 that can answer one byte at a time, forever.

    with TricklingTeacher() as teacher:      # answers at once ("ok")
        teacher.mode = "body"                # from the next request: headers, then 1 byte/50 ms
        ...

A plain socket server, so the trickle is real bytes on a real connection: each byte arrives
well within any per-read timeout, and only a total deadline ends a call.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from types import TracebackType
from typing import Literal

Mode = Literal["ok", "headers", "body"]


class TricklingTeacher:
    """An OIP teacher on 127.0.0.1 whose `mode` decides how it answers each request:
    "ok" (at once), "headers" (the head one byte per 50 ms, forever) or "body" (the head at
    once, then the body one byte per 50 ms, forever)."""

    def __init__(self) -> None:
        self.mode: Mode = "ok"
        self.requests = 0  # requests read so far
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            reader = conn.makefile("rb")
            while not self.stop.is_set():
                length = 0
                while (line := reader.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if line == b"":
                    return
                rows = json.loads(reader.read(length))["inputs"][0]["shape"][0]
                self.requests += 1
                answer = json.dumps(
                    {"outputs": [{"name": "logits", "shape": [rows, 2], "data": [0.5] * rows * 2}]}
                ).encode()
                head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(answer)}\r\n\r\n".encode()
                if self.mode == "ok":
                    conn.sendall(head + answer)
                    continue
                # An endless header line, or an endless body behind a huge content-length.
                slow = b"HTTP/1.1 200 OK\r\nx-slow: " if self.mode == "headers" else b"{"
                slow += b" " * 10**6
                if self.mode == "body":
                    conn.sendall(head.replace(str(len(answer)).encode(), b"1000001"))
                for byte in slow:
                    if self.stop.wait(0.05):
                        return
                    conn.sendall(bytes([byte]))
                return

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        for thread in self.threads:
            thread.join(5)

    def __enter__(self) -> TricklingTeacher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
