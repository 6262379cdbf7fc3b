"""Streaming a blob from the store over HTTP, whole or one byte range, in one pass over its bytes.

The uvicorn in use offers no zero-copy send (no `http.response.pathsend` / sendfile extension), so the body goes
out in large chunks read with `os.pread` in a worker thread, the next chunk read while the previous one is being
written (Starlette's FileResponse reads 64 KiB at a time, one after the other). Nothing hashes while serving:
the digests were checked when the blob came in and `registry verify` re-checks them; the route only compares
the stat stamp of the file it opened.
"""
from __future__ import annotations

import logging
import os
import re
from typing import BinaryIO

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

log = logging.getLogger("registry.server")
CHUNK = 1024 * 1024
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE | re.ASCII)


class RangeNotSatisfiable(Exception):
    """A Range that names no byte of the file (416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range [start, end) a `Range` header asks for; None to send the whole file.

    Understands `bytes=a-b`, `bytes=a-` and `bytes=-n` (the last n bytes). A header that is malformed, asks
    for several ranges, or is not about bytes is ignored (the whole file, 200), as HTTP allows; one that names
    no byte of the file raises RangeNotSatisfiable. Positions of any length are valid (RFC 9110's `1*DIGIT`):
    one beyond any file size reads as "past the end" without parsing all its digits."""
    if header is None:
        return None
    match = _RANGE_RE.match(header)
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # a suffix: the last n bytes
        n = _position(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable()
        return max(0, size - n), size
    start = _position(first)
    end = size if not last else _position(last) + 1
    if last and end <= start:  # bytes=5-3: malformed, ignored
        return None
    if start >= size:
        raise RangeNotSatisfiable()
    return start, min(end, size)


BEYOND_ANY_FILE = 1 << 63  # no file is this large: a longer position means the same as this one


def _position(digits: str) -> int:
    """A byte position from the header's digits; Python refuses to parse more than 4300 digits at once."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else BEYOND_ANY_FILE


class BlobResponse(Response):
    """The bytes [start, end) of an open blob file (or only the headers, for HEAD). Closes the file when done."""

    def __init__(self, handle: BinaryIO, start: int, end: int, status_code: int, headers: dict[str, str],
                 send_body: bool = True):
        self.handle, self.start, self.end = handle, start, end
        self.status_code = status_code
        self.send_body = send_body
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if not self.send_body or self.start >= self.end:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            if not await self._stream(receive, send):
                return  # the file shrank: leave the response incomplete, so the server drops the connection
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away (servers that raise on sending to a closed connection)
            pass
        finally:
            self.handle.close()

    async def _stream(self, receive: Receive, send: Send) -> bool:
        """Send the range; False when the file turned out shorter than its size."""
        chunks_out, chunks_in = anyio.create_memory_object_stream[bytes](1)
        short = False

        async def read_ahead() -> None:
            # One chunk is read in a worker thread while the one before is written to the socket.
            nonlocal short
            fd, offset = self.handle.fileno(), self.start
            async with chunks_out:
                while offset < self.end:
                    chunk = await anyio.to_thread.run_sync(os.pread, fd, min(CHUNK, self.end - offset), offset)
                    if not chunk:
                        short = True
                        log.warning("blob %s is shorter than the catalog says; response cut short", self.handle.name)
                        return
                    offset += len(chunk)
                    await chunks_out.send(chunk)

        async def watch_disconnect() -> None:
            # Stop reading the file as soon as the client goes away (this uvicorn's send() then returns quietly).
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(read_ahead)
            group.start_soon(watch_disconnect)
            async with chunks_in:
                async for chunk in chunks_in:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            group.cancel_scope.cancel()
        return not short
