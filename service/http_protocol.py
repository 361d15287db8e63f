"""uvicorn's HTTP/1.1 protocol with a deadline on each request's head (request line and headers).

uvicorn times out idle keep-alive connections but not a client that trickles its headers a byte at
a time (slowloris): such a connection would be held open for as long as the client likes. Here a
head that is not complete `timeout_s` after its first byte (or after the connection opened) gets
408 and the connection is closed. Bodies have their own deadline in `service.inputs.read_body`.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

LOG = logging.getLogger(__name__)
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: 33\r\n\r\nthe request head came too slowly\n"
)


def head_deadline_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (`Config(http=...)`), with this deadline in seconds."""

    class HeadDeadlineProtocol(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm_head_deadline(self) -> None:
            self._cancel_head_deadline()
            self._head_timer = self.loop.call_later(timeout_s, self._head_too_slow)

        def _cancel_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                LOG.info("closing a connection from %s: no complete request head in %g s", self.client, timeout_s)
                self.transport.write(TIMEOUT_RESPONSE)
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm_head_deadline()  # the next request on a kept-alive connection

        def on_headers_complete(self) -> None:
            self._cancel_head_deadline()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_head_deadline()
            super().connection_lost(exc)

    return HeadDeadlineProtocol
