"""A loopback TCP proxy in front of a real server, to inject network faults on demand.

Modes: ``pass`` forwards; ``hang`` accepts and never answers (a slow or wedged server);
``cut`` forwards until ``cut_after`` bytes of a request went through, then resets both
sides (the server dies mid-upload); ``down`` refuses connections (stops listening).
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Literal

Mode = Literal["pass", "hang", "cut", "down"]


class FaultProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.mode: Mode = "pass"
        self.cut_after = 0
        self.cuts = 0  # connections reset by ``cut``
        self.accepted = 0  # connections accepted since the last ``set``
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set(self, mode: Mode, cut_after: int = 0) -> None:
        self.mode, self.cut_after, self.accepted = mode, cut_after, 0
        if mode != "pass":
            self._drop_all()  # pooled keep-alive connections must not bypass the fault

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._drop_all()

    def _drop_all(self) -> None:
        for s in list(self._open):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        self._open.clear()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._open.append(client)
            self.accepted += 1
            if self.mode == "down":
                client.close()
                continue
            if self.mode == "hang":
                continue  # held open, never read from or answered
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self._open.append(upstream)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, request: bool) -> None:
        sent = 0
        try:
            while chunk := src.recv(65536):
                if request and self.mode == "cut" and sent + len(chunk) > self.cut_after:
                    dst.sendall(chunk[: max(0, self.cut_after - sent)])
                    self.cuts += 1
                    for s in (src, dst):  # RST, not FIN: the server sees a broken upload
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        s.close()
                    return
                dst.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
