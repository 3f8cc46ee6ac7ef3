"""Forward one HTTP request to a worker and stream its response back unchanged."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from firetitan.server.common import error_json

# Hop-by-hop and framing headers belong to each connection, not to the forwarded message.
_DROP_REQUEST = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "upgrade",
                 "accept-encoding"}
_DROP_RESPONSE = {"content-length", "connection", "keep-alive", "transfer-encoding", "content-encoding",
                  "server", "date"}


async def forward(request: web.Request, target_url: str, session: aiohttp.ClientSession,
                  *, body: bytes | None = None) -> web.StreamResponse:
    """Send `request` to `target_url`; stream the answer (SSE included) chunk by chunk.

    An unreachable worker becomes a 503 so clients retry; there is no total timeout because
    streams and long-polls legitimately run long, but connecting is bounded.
    """
    data = await request.read() if body is None else body
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    resp: web.StreamResponse | None = None
    try:
        upstream_cm = session.request(
            request.method, target_url, params=request.query, data=data, headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0), allow_redirects=False)
        async with upstream_cm as upstream:
            kept = [(k, v) for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE]
            if upstream.content_type != "text/event-stream" and upstream.content_length is not None:
                # A plain JSON answer (trainer calls, hot-loads): pass it on whole, in one write.
                plain = web.Response(status=upstream.status, reason=upstream.reason, body=await upstream.read())
                for name, value in kept:
                    plain.headers.add(name, value)
                return plain
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in kept:
                resp.headers.add(name, value)
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
        if resp is not None and resp.prepared:
            # Headers already went out: all we can do is cut the stream short.
            raise
        return error_json(503, f"worker at {target_url} is unreachable: {type(exc).__name__}: {exc}",
                          type_name="APIConnectionError")
