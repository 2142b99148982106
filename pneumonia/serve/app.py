"""The web page and JSON API around one trained model.

    GET  /          the page: drop a radiograph, see P(pneumonia), the decision, the Grad-CAM
                    overlay and the model card
    POST /predict   multipart field `file` (JPEG, PNG or DICOM): the fields of a
                    `pneumonia.predict` row, plus the radiograph and its overlay as base64 PNG
    GET  /model     the model's identity, preprocessing, threshold and model card
    GET  /health    {"status": "ok", ...}
    GET  /docs      the OpenAPI schema, browsable (/openapi.json raw)

Uploads are size-limited (413), type-checked by content (415) and decoded in memory (FastAPI
spools a large multipart upload to the system's temporary folder, nowhere else) under the
decode budget of `pneumonia.data.decode` (an image whose header promises more pixels gets 413
before they are decoded); an image that cannot be decoded gets 422 with the reason. Two uploads
are decoded and scored at once; one that waits longer than a few seconds for its turn gets 503
with Retry-After. Requests by a name that is not the server's, or sent by another site's page,
are refused (400, 403: `uploads`). Every error, an unexpected one included (500), is
{"detail": "one line"}, and the server keeps serving.

The page shows what it is sent as text, never as markup (a model card travels in a checkpoint,
a file people exchange), and every response carries a Content-Security-Policy that allows
scripts and styles only from the server's own files (`page.js`, `page.css`), never inline.
HEAD is answered on every GET endpoint.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Collection
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from pneumonia.core.errors import first_line
from pneumonia.data.decode import (
    CorruptImageError,
    ImageTooLarge,
    crop_to_roi,
    decode_bytes,
    to_input,
)
from pneumonia.inference.explain import overlay, png_bytes
from pneumonia.inference.predictor import Predictor, preview, reason_of
from pneumonia.serve.uploads import (
    ACCEPTED,
    MAX_UPLOAD,
    LimitBody,
    SameOrigin,
    Slots,
    check_type,
    reply,
)

SLOTS = 2  # uploads decoded and scored at once: each may hold an image at the decode budget
WAIT_S = 5.0  # how long an upload waits for a slot before its 503
# Scripts, styles and everything else from the server's own files only: nothing inline, so
# markup that slipped into the page could not run.
POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = {
    "content-security-policy": POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}
# The files the page is made of: (name, media type).
PAGE_FILES = {
    "/": ("page.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
log = logging.getLogger("uvicorn.error")  # the server's own log, beside uvicorn's lines


class Prediction(BaseModel):
    """The answer for one upload: a `pneumonia.predict` row and two pictures."""

    path: str = Field(description="the uploaded file's name")
    probability: float = Field(description="P(positive class), from 0 to 1")
    # A three-class model's softmax (probability is then P(BACTERIA) + P(VIRUS)).
    p_NORMAL: float | None = Field(None, description="three-class models: P(NORMAL)")
    p_BACTERIA: float | None = Field(None, description="three-class models: P(BACTERIA)")
    p_VIRUS: float | None = Field(None, description="three-class models: P(VIRUS)")
    decision: str = Field(description="the positive class when probability > threshold")
    threshold: float
    model: str
    image_size: int = Field(description="side of the square the model sees, in pixels")
    checkpoint: str = Field(description="first 16 hex digits of the checkpoint's SHA-256")
    cause: str | None = Field(
        None, description="three-class models: the likelier of BACTERIA and VIRUS when positive"
    )
    image_png: str = Field(description="the radiograph as decoded, base64 PNG")
    heatmap_png: str | None = Field(None, description="Grad-CAM overlay, base64 PNG")


class Health(BaseModel):
    status: str
    model: str
    checkpoint: str


def create_app(
    predictor: Predictor,
    max_upload: int = MAX_UPLOAD,
    hosts: Collection[str] | None = None,
    origins: Collection[str] = (),
    slots: int = SLOTS,
    wait_s: float = WAIT_S,
) -> FastAPI:
    """The application serving `predictor`: requests above `max_upload` bytes get 413, a Host
    not in `hosts` 400 (None: any), a POST from a page of another origin than the server's or
    `origins` 403 (`uploads.SameOrigin`); `slots` uploads are scored at once, one that waits
    `wait_s` seconds for its turn gets 503."""
    model = predictor.model
    app = FastAPI(
        title="pneumonia",
        summary="NORMAL vs PNEUMONIA on chest radiographs: a research tool, not a diagnostic "
        "device",
        description=__doc__,
        docs_url=None,  # served below, with a policy that lets Swagger UI's own script run
        redoc_url=None,
    )
    # One forward pass at a time: Grad-CAM hooks the model, and two requests' hooks would mix.
    model_lock = threading.Lock()
    turns = Slots(slots, wait_s)

    @app.exception_handler(RequestValidationError)
    async def one_line(request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        detail = f"{where}: {first.get('msg', 'invalid')}: send {ACCEPTED} as form field 'file'"
        return JSONResponse({"detail": detail}, status_code=422)

    for url, (name, media) in PAGE_FILES.items():
        app.add_api_route(url, _static(name, media), methods=["GET"], include_in_schema=False)
    app.add_api_route("/docs", _docs_page(app), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", model=model.name, checkpoint=model.checkpoint)

    @app.get("/model")
    def describe() -> dict:
        return model.describe()

    # Binary models answer without the three-class fields (only what answer() sets is sent).
    @app.post(
        "/predict",
        responses={413: {}, 415: {}, 422: {}, 503: {}},
        response_model_exclude_unset=True,
    )
    def predict(
        file: Annotated[UploadFile, File(description=ACCEPTED)], cam: bool = True
    ) -> Prediction:
        """P(pneumonia), the decision at the model's threshold and (with cam) the Grad-CAM
        overlay of one radiograph."""
        with turns.held():  # the bytes too: each turn holds at most one upload in memory
            data = file.file.read()
            row = answer(predictor, data, file.filename or "upload", cam, model_lock)
        return Prediction(**row)

    app.add_middleware(LimitBody, limit=max_upload)
    app.add_middleware(SameOrigin, hosts=hosts, origins=origins)
    app.add_middleware(Shield)
    return app


def _static(name: str, media: str):
    """A GET endpoint answering one of the page's files."""
    body = resources.files("pneumonia.serve").joinpath(name).read_bytes()

    def page_file() -> Response:
        return Response(body, media_type=media)

    return page_file


def _docs_page(app: FastAPI):
    """GET /docs: FastAPI's Swagger UI, whose one inline script is allowed by its hash (the
    page shows the schema, nothing a checkpoint or an upload says)."""
    assert app.openapi_url is not None  # the app keeps FastAPI's schema at /openapi.json
    page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI")
    scripts = re.findall(rb"<script>(.*?)</script>", page.body, re.DOTALL)
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in scripts
    )
    cdn = "https://cdn.jsdelivr.net"
    policy = POLICY.replace("script-src 'self'", f"script-src 'self' {cdn} {hashes}")
    policy = policy.replace("style-src 'self'", f"style-src 'self' {cdn}")
    policy = policy.replace("img-src 'self'", "img-src 'self' https://fastapi.tiangolo.com")

    def docs() -> HTMLResponse:
        return HTMLResponse(page.body, headers={"content-security-policy": policy})

    return docs


class Shield:
    """ASGI middleware around everything else: every response carries `HEADERS` (a route may
    set its own Content-Security-Policy), HEAD is answered as GET without the body, and an
    unexpected exception becomes a 500 with one line (its traceback goes to the server's log)
    while the server keeps serving."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = scope["method"] == "HEAD"
        started = False

        async def guarded(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = message | {"headers": _with_headers(message.get("headers", []))}
            elif message["type"] == "http.response.body" and head:
                message = message | {"body": b""}
            await send(message)

        try:
            await self.app(scope | {"method": "GET"} if head else scope, receive, guarded)
        except ClientDisconnect:
            return  # nobody is left to answer
        except Exception as err:  # a bug of ours or of a library: the next request is served
            log.exception("%s %s failed", scope["method"], scope.get("path", ""))
            if not started:
                detail = f"internal error ({type(err).__name__}: {first_line(err, 120)})"
                await reply(guarded, 500, f"{detail}: the server logged it and keeps serving")


def _with_headers(headers) -> list[tuple[bytes, bytes]]:
    """A response's headers with each of `HEADERS` it does not set itself."""
    headers = list(headers)
    present = {bytes(key).lower() for key, _ in headers}
    return headers + [
        (key.encode(), value.encode())
        for key, value in HEADERS.items()
        if key.encode() not in present
    ]


def answer(predictor: Predictor, data: bytes, name: str, cam: bool, lock=None) -> dict:
    """Everything POST /predict computes for an upload's bytes: the row, the radiograph and
    (with `cam`) its overlay as base64 PNG; HTTPException 400/413/415/422 for a bad upload.
    `lock` serialises the model's use across request threads."""
    check_type(data, name)
    try:
        full = crop_to_roi(decode_bytes(data, name), predictor.model.roi)[0]
    except ImageTooLarge as err:  # refused from its header, before its pixels took memory
        raise HTTPException(413, f"{name}: {reason_of(err)}") from None
    except CorruptImageError as err:
        raise HTTPException(422, f"{name}: {reason_of(err)}") from None
    image = to_input(full, predictor.model.image_size, predictor.model.intensity)[None]
    with lock or contextlib.nullcontext():
        probs, class_probs = predictor.scores(image)
        cam = cam and predictor.explains
        if cam:
            maps, _ = predictor.heatmaps(image)
    shown = preview(full)
    per_class = class_probs[0] if class_probs is not None else None
    return predictor.model.row(name, float(probs[0]), per_class) | {
        "image_png": _b64(png_bytes(shown[0].numpy())),
        "heatmap_png": _b64(png_bytes(overlay(shown, maps[0]))) if cam else None,
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
