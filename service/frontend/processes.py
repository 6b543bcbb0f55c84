"""``--frontends N``: N front-end processes on the public port, started and watched by the
model's process (which then listens on a private Unix socket only).

One process owns the model and the device; a Python process's event loop and GIL cap
the HTTP, JSON and image work it can do beside them (bench/RESULTS.md, host cost), so
that work moves to processes of its own, as vLLM's API servers sit in front of its
engine core. The public socket is bound here and inherited by every front end, so the
kernel hands each connection to whichever front end accepts it first. A front end that
dies is replaced; three dying within seconds of their start stop the service.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import uvicorn

from service.settings import Settings

log = logging.getLogger("promptswap")

QUICK_EXIT_S = 10.0  # a front end that dies sooner after its start counts as a failed start
FAILED_STARTS = 3  # in a row: the service stops (a front end cannot start: say so, do not loop)
STOP_TIMEOUT_S = 30.0  # a front end's drain at shutdown before it is killed


def private_socket_path() -> Path:
    """A Unix socket path in a fresh directory only this user can enter."""
    return Path(tempfile.mkdtemp(prefix="promptswap-")) / "model.sock"  # mkdtemp: mode 0700


class Frontends:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine_socket = str(private_socket_path())  # the model's process listens here
        self.count = settings.frontends
        self._sock: socket.socket | None = None
        self._procs: list[BaseProcess] = []
        self._started: list[float] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()

    def start(self, on_fatal: Callable[[str], None] | None) -> None:
        """Bind the public port and start the front ends (the model's process may serve now)."""
        s = self.settings
        self._sock = listening_socket(s.host, s.port)
        with self._lock:
            for index in range(self.count):
                self._procs.append(self._spawn(index))
                self._started.append(time.monotonic())
        threading.Thread(target=self._watch, args=(on_fatal,), name="frontends", daemon=True).start()
        log.info("serving on %s:%d through %d front-end processes", s.host, s.port, self.count)

    def _spawn(self, index: int) -> BaseProcess:
        # spawn, not fork: the model's process holds threads (and maybe CUDA), which fork copies badly
        proc = multiprocessing.get_context("spawn").Process(
            target=run_frontend,
            args=(self.settings, self.engine_socket, self._sock, index),
            name=f"promptswap-frontend-{index}",
        )
        proc.start()
        return proc

    def _watch(self, on_fatal: Callable[[str], None] | None) -> None:
        failed_starts = 0
        while not self._stopping.is_set():
            with self._lock:
                sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
            ready = wait(list(sentinels), timeout=1.0)  # a front end exited, or look again
            for sentinel in ready:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    index = sentinels[sentinel]  # type: ignore[index]  # wait returns the sentinels given
                    dead = self._procs[index]
                    dead.join()  # reaped: no zombie is left behind
                    lived = time.monotonic() - self._started[index]
                    failed_starts = failed_starts + 1 if lived < QUICK_EXIT_S else 0
                    log.error(
                        "front-end process %d (pid %s) exited with %s after %.1f s",
                        index,
                        dead.pid,
                        dead.exitcode,
                        lived,
                    )
                    if failed_starts >= FAILED_STARTS:
                        message = (
                            f"{failed_starts} front-end processes exited right after starting (see the log)"
                        )
                        if on_fatal is not None:
                            on_fatal(message)
                        return
                    self._procs[index] = self._spawn(index)
                    self._started[index] = time.monotonic()

    def stop(self) -> None:
        """Close the public port, let each front end finish its requests (SIGTERM), then remove
        the private socket."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            procs = list(self._procs)
        if self._sock is not None:  # once the front ends close theirs, new connections are refused
            self._sock.close()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        give_up = time.monotonic() + STOP_TIMEOUT_S
        for proc in procs:
            proc.join(max(0.0, give_up - time.monotonic()))
            if proc.is_alive():
                log.warning(
                    "front-end process %s did not stop in %.0f s; killing it", proc.pid, STOP_TIMEOUT_S
                )
                proc.kill()
                proc.join()
        self.remove_socket()

    def remove_socket(self) -> None:
        """The private socket and its directory (the model's process may still listen on it)."""
        path = Path(self.engine_socket)
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()
        except FileNotFoundError:
            pass


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` (IPv4 or IPv6, as ``host`` resolves)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
    sock.bind(address)
    sock.listen(2048)  # uvicorn's default backlog
    return sock


class FrontedServer(uvicorn.Server):
    """The model's process's server: on SIGINT/SIGTERM the front ends drain first (their
    requests still need this process), then this server stops as uvicorn does."""

    def __init__(self, config: uvicorn.Config, frontends: Frontends) -> None:
        super().__init__(config)
        self.frontends = frontends
        self._draining: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is None:
            self._draining = threading.Thread(target=self._drain_then_exit, args=(sig, frame), daemon=True)
            self._draining.start()
            return
        super().handle_exit(sig, frame)  # a second signal: uvicorn's (SIGINT twice forces)

    def _drain_then_exit(self, sig: int, frame: FrameType | None) -> None:
        self.frontends.stop()
        super().handle_exit(sig, frame)


def run_frontend(settings: Settings, engine_socket: str, sock: socket.socket, index: int) -> None:
    """A front-end process's main: its app on the inherited public socket until SIGTERM."""
    from service.frontend.app import FrontendApp

    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s %(name)s[frontend {index}]: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per forwarded request otherwise
    # Its threads decode and resize (Pillow); torch only wraps the pixels: no OpenMP team here.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    parent = multiprocessing.parent_process()
    if parent is not None:  # the model's process died (SIGKILL, OOM): nothing here can be answered
        threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    app = FrontendApp(settings, engine_socket)
    config = uvicorn.Config(app, log_level=settings.log_level, lifespan="on", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


def _exit_with(parent: BaseProcess) -> None:
    wait([parent.sentinel])
    log.error("the model's process exited; this front end stops")
    os.kill(os.getpid(), signal.SIGTERM)
