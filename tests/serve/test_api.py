"""The JSON API of `pneumonia.serve`: answers equal `predict`'s rows, every bad upload gets its
4xx with a one-line reason, and the server keeps serving."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from conftest import write_dicom, write_image
from fastapi.testclient import TestClient
from PIL import Image

from pneumonia.data.decode import decode_file
from pneumonia.inference.predictor import Predictor
from pneumonia.serve.app import create_app

LIMIT = 1 << 20  # 1 MiB: small enough to exceed cheaply


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, max_upload=LIMIT)) as client:
        yield client


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uploads")
    ramp = np.linspace(0, 60000, 40 * 30).reshape(40, 30).astype(np.uint16)
    return {
        "jpeg": write_image(folder / "x.jpeg", 80, (60, 50)),
        "png": write_image(folder / "y.png", 170, (50, 60), fmt="PNG"),
        "dicom": write_dicom(folder / "z.dcm", ramp),
        "no_pixels": write_dicom(folder / "empty.dcm", ramp, with_pixels=False),
    }


def post(client, name: str, data: bytes, **params):
    return client.post("/predict", files={"file": (name, data)}, params=params)


def picture(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


@pytest.mark.parametrize("kind", ["jpeg", "png", "dicom"])
def test_predict_answers_as_the_cli_does_with_both_pictures(client, predictor, files, kind):
    path = files[kind]
    response = post(client, path.name, path.read_bytes())
    assert response.status_code == 200
    body = response.json()
    p = float(predictor.probabilities(decode_file(path, 32)[None])[0])
    assert body | {"image_png": None, "heatmap_png": None} == predictor.model.row(path.name, p) | {
        "image_png": None,
        "heatmap_png": None,
    }
    image, overlay = picture(body["image_png"]), picture(body["heatmap_png"])
    width, height = (30, 40) if kind == "dicom" else Image.open(path).size
    assert image.size == overlay.size == (width, height)
    assert image.mode == "L" and overlay.mode == "RGB"


def test_without_cam_there_is_no_heatmap(client, files):
    body = post(client, "x.jpeg", files["jpeg"].read_bytes(), cam="false").json()
    assert body["heatmap_png"] is None and 0 <= body["probability"] <= 1


def test_health_model_card_and_openapi(client, predictor):
    assert client.get("/health").json() == {
        "status": "ok",
        "model": "se_resnet18",
        "checkpoint": predictor.model.checkpoint,
    }
    model = client.get("/model").json()
    assert model["threshold"] == 0.5 and model["image_size"] == 32
    assert model["card"]["val_shift"]["ci95"]["auroc"] == [0.6, 0.9]
    schema = client.get("/openapi.json").json()
    fields = schema["components"]["schemas"]["Prediction"]["properties"]
    assert {"probability", "decision", "checkpoint", "heatmap_png"} <= set(fields)
    assert "/predict" in schema["paths"] and "/health" in schema["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnostic device" in page.text


def _chunks(size: int):
    for _ in range(size // 65536 + 1):
        yield b"\0" * 65536


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("text", 415, "notes.txt is not a JPEG, PNG or DICOM file"),
        ("empty", 400, "empty upload"),
        ("truncated_jpeg", 422, "x.jpeg: truncated or corrupt image data"),
        ("dicom_without_pixels", 422, "empty.dcm: DICOM file without pixel data"),
        ("oversized", 413, "upload larger than 1 MiB"),
        ("oversized_chunked", 413, "upload larger than 1 MiB"),
        ("no_file_field", 422, "file: Field required"),
    ],
)
def test_bad_uploads_get_a_4xx_with_one_line_and_the_server_keeps_serving(
    client, files, case, status, reason
):
    jpeg = files["jpeg"].read_bytes()
    if case == "text":
        response = post(client, "notes.txt", b"hello, not an image")
    elif case == "empty":
        response = post(client, "x.png", b"")
    elif case == "truncated_jpeg":
        response = post(client, "x.jpeg", jpeg[: len(jpeg) // 3])
    elif case == "dicom_without_pixels":
        response = post(client, "empty.dcm", files["no_pixels"].read_bytes())
    elif case == "oversized":
        response = post(client, "big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * LIMIT)
    elif case == "oversized_chunked":  # no Content-Length: cut off while streaming
        response = client.post(
            "/predict",
            content=_chunks(2 * LIMIT),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
    else:
        response = client.post("/predict", data={"other": "1"})
    assert response.status_code == status
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail.startswith(reason)
    assert client.get("/health").status_code == 200
    assert post(client, "x.jpeg", jpeg, cam="false").status_code == 200


def test_concurrent_requests_each_get_their_own_answer(client, predictor, files):
    from concurrent.futures import ThreadPoolExecutor

    uploads = [files["jpeg"], files["png"], files["dicom"]] * 3
    with ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda p: post(client, p.name, p.read_bytes()).json(), uploads))
    for path, body in zip(uploads, bodies, strict=True):
        p = float(predictor.probabilities(decode_file(path, 32)[None])[0])
        assert body["path"] == path.name and body["probability"] == pytest.approx(p, abs=1e-6)
    assert torch.is_grad_enabled()  # Grad-CAM leaves the caller's autograd state alone
