"""The web page and JSON API around one trained model.

    GET  /          the page: drop a radiograph, see P(pneumonia), the decision, the Grad-CAM
                    overlay and the model card
    POST /predict   multipart field `file` (JPEG, PNG or DICOM): the fields of a
                    `pneumonia.predict` row, plus the radiograph and its overlay as base64 PNG
    GET  /model     the model's identity, preprocessing, threshold and model card
    GET  /health    {"status": "ok", ...}
    GET  /docs      the OpenAPI schema, browsable (/openapi.json raw)

Uploads are size-limited (413), type-checked by content (415) and decoded in memory (FastAPI
spools a large multipart upload to the system's temporary folder, nowhere else); an image
that cannot be decoded gets 422 with the reason. Every error is {"detail": "one line"}.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from importlib import resources
from typing import Annotated

from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from pneumonia.data.decode import CorruptImageError, crop_to_roi, decode_bytes, to_input
from pneumonia.explain import overlay, png_bytes
from pneumonia.predictor import Predictor, preview, reason_of
from pneumonia.serve.uploads import ACCEPTED, LimitBody, check_type

MAX_UPLOAD = 32 << 20  # bytes: a 16-bit DICOM chest radiograph is typically 8-20 MiB


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


def create_app(predictor: Predictor, max_upload: int = MAX_UPLOAD) -> FastAPI:
    """The application serving `predictor`; requests above `max_upload` bytes get 413."""
    model = predictor.model
    app = FastAPI(
        title="pneumonia",
        summary="NORMAL vs PNEUMONIA on chest radiographs: a research tool, not a diagnostic "
        "device",
        description=__doc__,
    )
    # One forward pass at a time: Grad-CAM hooks the model, and two requests' hooks would mix.
    model_lock = threading.Lock()
    page = resources.files("pneumonia.serve").joinpath("page.html").read_text()

    @app.exception_handler(RequestValidationError)
    async def one_line(request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        detail = f"{where}: {first.get('msg', 'invalid')}: send {ACCEPTED} as form field 'file'"
        return JSONResponse({"detail": detail}, status_code=422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/health")
    def health() -> Health:
        return Health(status="ok", model=model.name, checkpoint=model.checkpoint)

    @app.get("/model")
    def describe() -> dict:
        return model.describe()

    # Binary models answer without the three-class fields (only what answer() sets is sent).
    @app.post("/predict", responses={413: {}, 415: {}, 422: {}}, response_model_exclude_unset=True)
    def predict(
        file: Annotated[UploadFile, File(description=ACCEPTED)], cam: bool = True
    ) -> Prediction:
        """P(pneumonia), the decision at the model's threshold and (with cam) the Grad-CAM
        overlay of one radiograph."""
        data = file.file.read()
        return Prediction(**answer(predictor, data, file.filename or "upload", cam, model_lock))

    app.add_middleware(LimitBody, limit=max_upload)
    return app


def answer(predictor: Predictor, data: bytes, name: str, cam: bool, lock=None) -> dict:
    """Everything POST /predict computes for an upload's bytes: the row, the radiograph and
    (with `cam`) its overlay as base64 PNG; HTTPException 400/415/422 for a bad upload.
    `lock` serialises the model's use across request threads."""
    check_type(data, name)
    try:
        full = crop_to_roi(decode_bytes(data, name), predictor.model.roi)[0]
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
