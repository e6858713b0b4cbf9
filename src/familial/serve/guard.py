"""What a client must do to be served, checked before the API sees a request.

- Host: a server bound to a loopback address answers only requests addressed to a loopback
  name (one Host header, of the form name[:port] or [address][:port]), so a web page on another
  origin cannot reach it through DNS rebinding.
- Key: with an API key set, every route needs `Authorization: Bearer KEY` (as OpenAI and vLLM
  ask), the API's schema and docs pages included; /health and the playground page stay open (the
  page asks for the key).
- Time: the request head must arrive within `header_timeout` of the connection opening (or of
  the previous response), the body within `body_timeout`: a client sending a byte now and then
  cannot hold a connection. uvicorn has no header timeout, hence `TimedProtocol`.
- Size: a request head over `max_head_bytes` gets 431 and the connection closes (httptools
  grows a header by copying it on every read, so an endless one cost the event loop seconds);
  bodies over `max_body_bytes` get 413 before they are read; a body with more JSON items
  (commas) than a prompt of the model's context can hold gets 400 before it is parsed, since
  parsing runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from familial.serve.protocol import clip, error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# Paths served without the API key: probes and the page that asks for it.
OPEN_PATHS = ("/health", "/", "/playground")
HOST = re.compile(r"(?:\[(?P<address>[^\]]*)\]|(?P<name>[^:\[\]]*))(?::[0-9]*)?")


@dataclass
class ClientPolicy:
    # clients must send `Authorization: Bearer <api_key>` to /v1 routes; None: no key.
    api_key: str | None = None
    # refuse Host names other than localhost, 127.0.0.1 and [::1] (set when bound to loopback).
    loopback_only: bool = False
    max_body_bytes: int = 8 * 2**20
    # request line and headers; browsers send a few KiB, nginx accepts 32 KiB by default.
    max_head_bytes: int = 32 * 2**10
    header_timeout: float = 10.0
    body_timeout: float = 60.0


def host_name(header: str) -> str | None:
    """'localhost:8000' -> 'localhost'; '[::1]:8000' -> '::1'; None for what is not a
    Host header's form ('[::1]evil.com')."""
    match = HOST.fullmatch(header)
    if match is None:
        return None
    return match["address"] if match["address"] is not None else match["name"]


class Guard:
    """ASGI middleware applying a ClientPolicy; `max_items` bounds the JSON items of a body."""

    def __init__(self, app, policy: ClientPolicy, max_items: int | None = None) -> None:
        self.app, self.policy, self.max_items = app, policy, max_items

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        refusal = self.refusal(scope, headers, hosts)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body, refusal = await self.read_body(headers, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def refusal(self, scope, headers: dict[bytes, bytes], hosts: list[bytes]) -> JSONResponse | None:
        policy = self.policy
        if policy.loopback_only and hosts:
            if len(hosts) > 1:
                return _error(400, f"{len(hosts)} Host headers: a request names one host", "invalid_host")
            header = hosts[0].decode("latin-1")
            name = host_name(header)
            if name is None or name.lower() not in LOOPBACK_NAMES:
                return _error(400, f"Host '{clip(header)}' is not served: this server listens on a loopback "
                                   f"address and answers only to localhost, 127.0.0.1 or [::1]", "invalid_host")
        if policy.api_key is not None and scope["path"] not in OPEN_PATHS:
            scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), policy.api_key.encode()):
                message = ("no API key: send the header 'Authorization: Bearer <key>'" if not key else
                           "incorrect API key")
                return _error(401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return None

    async def read_body(self, headers: dict[bytes, bytes], receive) -> tuple[bytes, JSONResponse | None]:
        limit = self.policy.max_body_bytes
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > limit:
            # The rest of the body is read and dropped until the next request's head is
            # overdue (TimedProtocol), so a client that sent it all still reads this answer.
            return b"", _error(413, f"request body over {limit} bytes")
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.policy.body_timeout
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                return b"", _error(408, f"the request body did not arrive within {self.policy.body_timeout:g} s",
                                   "request_timeout", {"Connection": "close"})
            if message["type"] == "http.disconnect":
                return b"", _error(400, "the client closed the connection before sending the body")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return b"", _error(413, f"request body over {limit} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if self.max_items is not None and body.count(b",") > self.max_items:
            return b"", _error(400, f"the request holds more items than a prompt of this model's context can "
                                    f"({body.count(b',')} commas; at most {self.max_items})",
                               "context_length_exceeded")
        return body, None


def _error(status: int, message: str, code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, None, code), status, headers=headers)


class TimedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing connections whose request head does not arrive in time,
    or grows past `max_head_bytes` (answered 431)."""

    header_timeout = 10.0
    max_head_bytes = 32 * 2**10

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)
        # Bytes received since the last head was complete, while the next one is being read.
        self._head_bytes, self._reading_head = 0, True

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing: a read holding a whole head and then body bytes is no head too large.
        if self._reading_head and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            body = json.dumps(error_body(431, f"request line and headers over {self.max_head_bytes} bytes",
                                         None, "headers_too_large")).encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: application/json\r\nconnection: close\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._head_bytes, self._reading_head = 0, False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._head_timer.cancel()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

    def connection_lost(self, exc) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        # Only between requests: a request being read or answered is never cut here.
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()


def timed_protocol(header_timeout: float, max_head_bytes: int) -> type[TimedProtocol]:
    return type("TimedProtocol", (TimedProtocol,), {"header_timeout": header_timeout,
                                                     "max_head_bytes": max_head_bytes})


def uvicorn_server(app, policy: ClientPolicy, log_level: str = "info"):
    """The uvicorn server for `app` under `policy`'s timeouts; run it with `.run(sockets=[...])`."""
    import uvicorn

    # A stream still running when SIGTERM comes is given a few seconds, then the process ends.
    config = uvicorn.Config(app, http=timed_protocol(policy.header_timeout, policy.max_head_bytes),
                            log_level=log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
