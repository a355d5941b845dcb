"""uvicorn as ``medxai serve`` runs it: ONE function, :func:`uvicorn_config`, builds the server's configuration for
the command and for the tests alike, so that tests exercise what users run.

uvicorn bounds an idle keep-alive connection (``timeout_keep_alive``) but not the time a client may take to send its
request line and headers, nor their size with httptools: :class:`BoundedHttpProtocol` adds both (a connection that
has not completed its headers within ``header_timeout_s`` is answered 408 and closed, one whose headers pass
:data:`MAX_HEADER_BYTES` 431). The body's limits are the gate's (:mod:`medxai.serve.gate`), where the request is
known.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import logging

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from medxai.config import ServeConfig

__all__ = ["MAX_HEADER_BYTES", "MMAP_THRESHOLD_BYTES", "BoundedHttpProtocol", "tune_malloc", "uvicorn_config"]

logger = logging.getLogger(__name__)

#: Most bytes of a request line and headers (browsers send a few kB; cookies of other local apps add some).
MAX_HEADER_BYTES = 64 * 1024
KEEP_ALIVE_S = 5
GRACEFUL_SHUTDOWN_S = 5
#: Allocations this large are mapped on their own and unmapped when freed (a fixed threshold: glibc's own moves up).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_ARENA_MAX = -8  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on each request's headers.

    The deadline runs from the connection's opening, and on a kept-alive connection from the first byte of the next
    request, until its headers are complete. Subclassed per server by :func:`uvicorn_config` with its values.
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = False
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse(431, "headers_too_large", f"the request's headers pass {MAX_HEADER_BYTES // 1024} KiB")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._await_headers()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

    def _await_headers(self) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if not self._awaiting_headers or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # a pipelined request overdue behind one in progress: close after it
            return
        if self._header_bytes:
            self._refuse(408, "request_timeout", f"the request's headers did not arrive within "
                         f"{self.header_timeout_s:g} s (--header-timeout-s)")
        else:
            self.transport.close()  # a connection that never sent a byte: nothing to answer

    def _refuse(self, status: int, error: str, detail: str) -> None:
        """Answer before the request reached the application (JSON, as every error) and close."""
        self._awaiting_headers = False
        self._stop_header_timer()
        body = json.dumps({"error": error, "detail": detail}).encode()
        head = [STATUS_LINE[status], b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode() + b"\r\n",
                b"x-content-type-options: nosniff\r\n", b"cache-control: no-store\r\n", b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        logger.info("connection refused before its request: %d %s", status, error)


def uvicorn_config(app, config: ServeConfig, *, log_level: str = "info") -> uvicorn.Config:
    """The uvicorn configuration of ``medxai serve`` for ``app`` on ``config.host``:``config.port``."""
    protocol = type("MedxaiHttpProtocol", (BoundedHttpProtocol,), {"header_timeout_s": config.header_timeout_s})
    return uvicorn.Config(app, host=config.host, port=config.port, http=protocol, lifespan="on",
                          log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                          timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def tune_malloc(arenas: int) -> bool:
    """Bound what glibc's allocator keeps: at most ``arenas`` arenas, and buffers of :data:`MMAP_THRESHOLD_BYTES` or
    more mapped on their own (returned to the system when freed). False where the C library is not glibc.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core), and an arena keeps what was
    freed in it; it also raises its mmap threshold after each large free (up to 32 MiB), so that decoded images and
    encoded overlays of a few MB come to live in the arenas too. Under many concurrent uploads of large images the
    process then keeps hundreds of MB it no longer uses (``benchmarks/serve_memory.py``). Call before the server's
    threads start.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018  glibc only
    except (OSError, AttributeError, TypeError):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas)) and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
