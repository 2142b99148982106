"""What the server accepts: a size limit on every request body (before it is read to the end),
and a type check by content, not by name."""

from __future__ import annotations

from fastapi import HTTPException

from pneumonia.data.decode import is_dicom

ACCEPTED = "a JPEG, PNG or DICOM file"


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"upload larger than {limit // (1 << 20)} MiB: send a smaller file")


class LimitBody:
    """ASGI middleware: a body above `limit` bytes is refused with 413 as soon as it is known
    to be (from Content-Length, or while a chunked body streams in), never spooled whole."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _reply(send, 413, too_large(self.limit).detail)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise too_large(self.limit)
            return message

        await self.app(scope, limited, send)


async def _reply(send, status: int, detail: str) -> None:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_type(data: bytes, name: str) -> None:
    """415 unless the bytes are a JPEG, a PNG or a DICOM file (by their first bytes)."""
    if not data:
        raise HTTPException(400, "empty upload: choose a radiograph file")
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or is_dicom(data, name):
        return
    raise HTTPException(415, f"{name or 'the upload'} is not {ACCEPTED}")
