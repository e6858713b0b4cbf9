"""What a client must do to be served, checked before the API sees a request.

- Host: a server bound to a loopback address answers only requests addressed to a loopback
  name, so a web page on another origin cannot reach it through DNS rebinding.
- Key: with an API key set, every /v1 route needs `Authorization: Bearer KEY` (as OpenAI and
  vLLM ask); /health and the playground page stay open (the page asks for the key).
- Time: the request head must arrive within `header_timeout` of the connection opening (or of
  the previous response), the body within `body_timeout`: a client sending a byte now and then
  cannot hold a connection. uvicorn has no header timeout, hence `TimedProtocol`.
- Size: bodies over `max_body_bytes` get 413 before they are read; a body with more JSON items
  (commas) than a prompt of the model's context can hold gets 400 before it is parsed, since
  parsing runs on the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from familial.serve.protocol import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass
class ClientPolicy:
    # clients must send `Authorization: Bearer <api_key>` to /v1 routes; None: no key.
    api_key: str | None = None
    # refuse Host names other than localhost, 127.0.0.1 and [::1] (set when bound to loopback).
    loopback_only: bool = False
    max_body_bytes: int = 8 * 2**20
    header_timeout: float = 10.0
    body_timeout: float = 60.0


def host_name(header: str) -> str:
    """'localhost:8000' -> 'localhost'; '[::1]:8000' -> '::1'."""
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware applying a ClientPolicy; `max_items` bounds the JSON items of a body."""

    def __init__(self, app, policy: ClientPolicy, max_items: int | None = None) -> None:
        self.app, self.policy, self.max_items = app, policy, max_items

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self.refusal(scope, headers)
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

    def refusal(self, scope, headers: dict[bytes, bytes]) -> JSONResponse | None:
        policy = self.policy
        host = headers.get(b"host")
        if policy.loopback_only and host is not None:
            name = host_name(host.decode("latin-1"))
            if name.lower() not in LOOPBACK_NAMES:
                return _error(400, f"Host '{name}' is not served: this server listens on a loopback address "
                                   f"and answers only to localhost, 127.0.0.1 or [::1]", "invalid_host")
        if policy.api_key is not None and scope["path"].startswith("/v1"):
            scheme, _, key = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), policy.api_key.encode()):
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


class TimedProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, closing connections whose request head does not arrive in time."""

    header_timeout = 10.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_overdue)

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


def timed_protocol(header_timeout: float) -> type[TimedProtocol]:
    return type("TimedProtocol", (TimedProtocol,), {"header_timeout": header_timeout})


def uvicorn_server(app, policy: ClientPolicy, log_level: str = "info"):
    """The uvicorn server for `app` under `policy`'s timeouts; run it with `.run(sockets=[...])`."""
    import uvicorn

    # A stream still running when SIGTERM comes is given a few seconds, then the process ends.
    config = uvicorn.Config(app, http=timed_protocol(policy.header_timeout), log_level=log_level,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
