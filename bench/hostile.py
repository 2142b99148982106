"""Hostile files and uploads, as a security reviewer and a careful new user meet them: one row
per case with the exit code (or HTTP status), the last line printed, what is left on disk and
the peak memory of the process that met the file.

    python bench/hostile.py                              # this checkout
    PYTHONPATH=/path/to/older/checkout python bench/hostile.py --label before

Every case runs `python -m pneumonia.*` (or a server) in a fresh temporary folder with a tiny
synthetic run (32 px, width 16): the table takes about ten minutes on two cores. Print-out: a
Markdown table. Peak memory is the child's peak resident set (VmHWM, polled every 50 ms), or
the server's after the request.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from faults import CENTRAL, FEDERATED, last_line

# Runs a pneumonia entry point after a patch (the same for either version of the code).
PATCHED = """
import runpy, sys
{patch}
sys.argv = ["{module}", *sys.argv[1:]]
runpy.run_module("{module}", run_name="__main__")
"""
# Signals itself as the final scoring starts: the epochs are saved, finalize is not done.
TERM_IN_FINALIZE = """
import os, signal
from pneumonia.run import job
original = job.finalize
def finalize(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)
job.finalize = finalize
"""
# Every file write fails as on a full disk.
DISK_FULL = """
import errno, os, pathlib, torch
def full(self, *args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
pathlib.Path.write_bytes = full
pathlib.Path.write_text = full
"""
SERVER_TIMEOUT = 120
MEMORY_CAP = 12 << 30  # bytes of address space per child (the bombs took 5-6 GB, some 22)


def measured(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[str, str, float, float]:
    """(exit code or 'hung', last stderr line, peak resident MiB, seconds) of one child."""
    start = time.monotonic()
    err_path = cwd / ".stderr"
    peak = 0
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=_memory_cap,
        )
        deadline = start + timeout
        while proc.poll() is None:
            peak = max(peak, _resident_peak(proc.pid))
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                return f"hung, killed after {timeout:.0f} s", "", 0.0, timeout
            time.sleep(0.05)
    code = proc.returncode
    line = last_line(err_path.read_text(errors="replace"))
    return str(code), line, peak / 1024, time.monotonic() - start


def _resident_peak(pid: int) -> int:
    """A running process's peak resident set in KiB (VmHWM; 0 once it has exited). Polled:
    os.wait4's ru_maxrss would count the memory this script held when it forked."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    line = next((x for x in status.splitlines() if x.startswith("VmHWM")), "VmHWM: 0 kB")
    return int(line.split()[1])


def _memory_cap() -> None:
    """A child may reserve at most MEMORY_CAP of address space: a case that tries to take the
    whole machine fails in that child (MemoryError) instead of waking the OOM killer."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def png_bomb(path: Path, side: int = 30000) -> Path:
    """An all-black grey PNG of side x side pixels, a few hundred KB on disk."""
    row = b"\x00" * (side + 1)  # filter byte + pixels
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def dicom(path: Path, rows: int = 64, deflated: bool = False, **fields) -> Path:
    """A 16-bit grey DICOM radiograph; `fields` set (or spoil) header values. An integer
    string field (IS) given letters is written as "1", then its bytes are spoiled: pydicom
    will not write letters there."""
    from pydicom import config
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "hostile"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    pixels = np.zeros((rows, rows), np.uint16)
    pixels[: rows // 2] = 4000  # not a constant image
    ds.PixelData = pixels.tobytes()
    config.settings.writing_validation_mode = config.IGNORE  # spoiled values on purpose
    spoiled = {k: v for k, v in fields.items() if k == "NumberOfFrames" and not v.isdigit()}
    for key, value in fields.items():
        setattr(ds, key, "1" if key in spoiled else value)
    ds.save_as(path, enforce_file_format=True)
    if spoiled:  # (0028,0008) IS, 2 bytes: "1 " -> two letters
        element = b"\x28\x00\x08\x00IS\x02\x00"
        path.write_bytes(path.read_bytes().replace(element + b"1 ", element + b"ab", 1))
    return path


def radiograph(path: Path, value: int = 90) -> Path:
    from PIL import Image

    pixels = np.full((48, 48), value, np.uint8)
    pixels[10:30, 10:30] = 200
    Image.fromarray(pixels).save(path)
    return path


def kermany(root: Path) -> Path:
    """A tiny folder of class folders with Kermany-like names, 8 images a class."""
    for cls, value in (("NORMAL", 60), ("PNEUMONIA", 180)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for p in range(8):
            stem = f"IM-{p:04d}-0001" if cls == "NORMAL" else f"person{p}_virus_{p}"
            radiograph(root / cls / f"{stem}.png", value)
    return root


class Server:
    """`python -m pneumonia.serve` on a free port for the length of a `with`."""

    def __init__(self, ckpt: Path, cwd: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        argv = ["-m", "pneumonia.serve", "--ckpt", str(ckpt), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [sys.executable, *argv], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + SERVER_TIMEOUT
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url("/health"), timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the server did not start")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def post(self, name: str, data: bytes, headers: dict | None = None) -> tuple[int, str, float]:
        """(status, detail or decision, seconds) of one upload."""
        boundary = "hostileboundary"
        body = (
            (
                f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
                f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            self.url("/predict?cam=false"),
            body,
            {"Content-Type": f"multipart/form-data; boundary={boundary}"} | (headers or {}),
        )
        start = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=SERVER_TIMEOUT) as reply:
                status, text = reply.status, json.loads(reply.read()).get("decision", "")
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read().decode(errors="replace")
            try:
                text = json.loads(raw).get("detail", raw)
            except ValueError:
                text = f"(not JSON) {raw[:80]}"
        return status, str(text)[:150], time.monotonic() - start

    def peak_mib(self) -> float:
        return _resident_peak(self.proc.pid) / 1024

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.code = self.proc.returncode


def cases(tmp: Path):
    """(class, case, run) for every case; run() returns (exit, line, left on disk, peak)."""
    ref = tmp / "ref"

    def reference() -> Path:
        if not ref.exists():
            measured(["-m", "pneumonia.fit", *CENTRAL, "--trainer.max_epochs", "2",
                      "--run_dir", str(ref)], tmp)  # fmt: skip
        return ref

    def ckpt() -> Path:
        return reference() / "checkpoints" / "best.ckpt"

    def folder(name: str, *files: tuple[str, callable]) -> Path:
        where = tmp / name
        where.mkdir(exist_ok=True)
        for file_name, make in files:
            make(where / file_name)
        return where

    def predict(*args: str, timeout: float = 120):
        return measured(["-m", "pneumonia.predict", "--ckpt", str(ckpt()), *args], tmp, timeout)

    def row(result, left: str = "", naming: str = "skipped") -> tuple:
        """The table's cells; the line is the first that holds `naming` (the file a command
        skipped) when there is one, else the last."""
        code, line, peak, seconds = result
        said = (tmp / ".stderr").read_text(errors="replace").splitlines()
        line = next((x.strip()[:230] for x in said if naming in x), line)
        return code, line, left, f"{peak:.0f} MiB, {seconds:.1f} s" if peak else f"{seconds:.1f} s"

    # 1 code from a file
    def card_script():
        evil = tmp / "evil-card.ckpt"
        loaded = torch.load(ckpt(), weights_only=True)
        card = loaded.setdefault("model_card", {})
        card["trained_on"] = {"images": "<img src=x onerror=\"document.title='pwned'\">"}
        torch.save(loaded, evil)
        with Server(evil, tmp) as server:
            with urllib.request.urlopen(server.url("/"), timeout=30) as reply:
                page, policy = reply.read().decode(), reply.headers.get("Content-Security-Policy")
            title = browser_title(server.url("/"))
        inner = "card" in page and "innerHTML" in page
        return (
            "200",
            f"page title in Chromium: {title}",
            f"CSP: {policy or 'none'}; page uses innerHTML: {inner}",
            "",
        )

    def planted_module():
        (tmp / "plant").mkdir(exist_ok=True)
        marker = tmp / "plant" / "PLANTED-RAN"
        (tmp / "plant" / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
        config = tmp / "plant" / "shared.yaml"
        config.write_text("trainer:\n  profiler:\n    class_path: planted.Anything\n")
        code, line, _, seconds = measured(
            ["-m", "pneumonia.fit", "--config", str(config), *CENTRAL], tmp / "plant"
        )
        return code, line, f"planted module ran: {marker.exists()}", f"{seconds:.1f} s"

    # 2 memory from a small upload
    def served_bomb(kind: str):
        def case():
            if kind == "png":
                name, data = "bomb.png", png_bomb(tmp / "bomb.png").read_bytes()
            else:
                path = dicom(tmp / "bomb.dcm", rows=12000, deflated=True)
                name, data = "bomb.dcm", path.read_bytes()
            with Server(ckpt(), tmp) as server:
                status, text, seconds = server.post(name, data)
                after, _, _ = server.post("ok.png", radiograph(tmp / "ok.png").read_bytes())
                peak = server.peak_mib()
            return (
                str(status),
                text,
                f"upload {len(data) // 1024} KiB; next request {after}",
                f"{peak:.0f} MiB server peak, {seconds:.1f} s",
            )

        return case

    def predict_bomb():
        return row(predict(str(png_bomb(tmp / "bomb-cli.png"))))

    def cross_origin():
        with Server(ckpt(), tmp) as server:
            data = radiograph(tmp / "ok.png").read_bytes()
            foreign = {"Origin": "http://evil.example", "Host": "evil.example"}
            status, text, seconds = server.post("ok.png", data, foreign)
        return str(status), text, "", f"{seconds:.1f} s"

    # 3 one bad DICOM stops a job
    def malformed(**fields):
        def case():
            name = "-".join(fields)
            where = folder(
                f"dicom-{name}",
                ("good.png", radiograph),
                ("bad.dcm", lambda p: dicom(p, **fields)),
            )
            out = tmp / f"dicom-{name}.csv"
            result = predict(str(where), "--output", str(out))
            rows = len(out.read_text().splitlines()) - 1 if out.exists() else 0
            return row(result, f"rows for good.png + bad.dcm: {rows}")

        return case

    def malformed_fit():
        root = kermany(tmp / "dicom-fit")
        dicom(root / "NORMAL" / "IM-0099-0001.dcm", NumberOfFrames="abc")
        argv = ["-m", "pneumonia.fit", *CENTRAL, "--trainer.max_epochs", "1",
                "--data.root", str(root), "--data.skip_corrupt", "true",
                "--run_dir", str(tmp / "dicom-fit-run")]  # fmt: skip
        result = measured(argv, tmp)
        left = f"summary.json: {(tmp / 'dicom-fit-run' / 'summary.json').exists()}"
        return row(result, left)

    # 4 data destroyed without a word
    def output_is_input():
        where = folder("own", ("a.png", radiograph))
        before = (where / "a.png").read_bytes()
        result = predict(str(where), "--output", str(where / "a.png"))
        return row(result, f"a.png intact: {(where / 'a.png').read_bytes() == before}")

    def cam_is_input():
        where = folder("cam", ("a.png", radiograph), ("b.png", radiograph))
        before = {p.name: p.read_bytes() for p in where.iterdir()}
        result = predict(str(where), "--cam", str(where))
        changed = sum(p.read_bytes() != before.get(p.name) for p in where.iterdir())
        return row(result, f"radiographs overwritten: {changed} of {len(before)}")

    def two_writers():
        run_dir = tmp / "shared-run"
        argv = ["-m", "pneumonia.fit", *CENTRAL, "--trainer.max_epochs", "30",
                "--run_dir", str(run_dir)]  # fmt: skip
        first = subprocess.Popen(
            [sys.executable, *argv], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 300
        while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, line, _, _ = measured(["-m", "pneumonia.fit", "--resume", str(run_dir)], tmp)
        first.communicate(timeout=600)
        epochs = []
        if (run_dir / "metrics.csv").exists():
            import csv

            with (run_dir / "metrics.csv").open() as file:
                epochs = [r.get("epoch") for r in csv.DictReader(file) if r.get("val/loss")]
        repeated = len(epochs) - len(set(epochs))
        return (
            f"{first.returncode} / {code}",
            line,
            f"metrics.csv: {len(epochs)} validation rows, {repeated} repeated",
            "",
        )

    def client_folder_lost():
        run_dir = tmp / "fl-run"
        argv = ["-m", "pneumonia.fit", *FEDERATED, "--federated.rounds", "2",
                "--run_dir", str(run_dir)]  # fmt: skip
        measured(argv, tmp)
        state = run_dir / "checkpoints" / "federated_state.pt"
        (run_dir / "summary.json").unlink(missing_ok=True)  # as if stopped after round 1
        if state.exists():  # rewind to round 1 so the resume has rounds left
            saved = torch.load(state, weights_only=True)
            saved["round"] = 1
            torch.save(saved, state)
        client = run_dir / "clients" / "client_0"
        shutil.rmtree(client, ignore_errors=True)
        client.write_text("")
        code, line, peak, seconds = measured(["-m", "pneumonia.fit", "--resume", str(run_dir)], tmp)
        warned = [x for x in (tmp / ".stderr").read_text().splitlines() if "client_0" in x]
        return code, (warned or [line])[-1][:200], "", f"{peak:.0f} MiB, {seconds:.1f} s"

    # 5 special files and hostile sizes
    def fifo():
        where = folder("fifo", ("a.png", radiograph))
        os.mkfifo(where / "pipe.png")
        return row(predict(str(where), timeout=30))

    def device_file():
        where = folder("dev", ("a.png", radiograph))
        (where / "zero.dcm").symlink_to("/dev/zero")
        return row(predict(str(where), timeout=60))

    def wide_checkpoint():
        loaded = torch.load(ckpt(), weights_only=True)
        loaded["hyper_parameters"]["model"]["width"] = 65536
        path = tmp / "wide.ckpt"
        torch.save(loaded, path)
        return row(predict(str(radiograph(tmp / "one.png")), "--ckpt", str(path)))

    def lying_onnx():
        path = tmp / "model.onnx"
        measured(["-m", "pneumonia.export", "--ckpt", str(ckpt()), "--onnx", str(path)], tmp)
        if not path.exists():
            return "-", "export failed", "", ""
        import onnx

        model = onnx.load(str(path))
        for entry in model.metadata_props:
            if entry.key == "image_size":
                entry.value = "60000"
        onnx.save(model, str(path))
        argv = ["-m", "pneumonia.predict", "--onnx", str(path), str(tmp / "one.png")]
        radiograph(tmp / "one.png")
        return row(measured(argv, tmp))

    def ensemble_not_utf8():
        member = tmp / "member"
        if not member.exists():
            shutil.copytree(reference(), member)
        with (member / "predictions.csv").open("ab") as file:
            file.write(b"\xff\xfe,broken\n")
        argv = ["-m", "pneumonia.ensemble", "--members", str(member / "checkpoints" / "best.ckpt"),
                str(ckpt()),
                "--out", str(tmp / "ens.ckpt"), "--rule", "soft_vote"]  # fmt: skip
        return row(measured(argv, tmp))

    # 6 messages that send the user the wrong way
    def term_in_finalize():
        run_dir = tmp / "finalize-run"
        code = PATCHED.format(patch=TERM_IN_FINALIZE, module="pneumonia.fit")
        argv = ["-c", code, *CENTRAL, "--trainer.max_epochs", "2", "--run_dir", str(run_dir)]
        first = measured(argv, tmp)
        again = measured(["-m", "pneumonia.fit", "--resume", str(run_dir)], tmp)
        done = (run_dir / "summary.json").exists()
        return row(first, f"then --resume: exit {again[0]}, summary.json {done}")

    def disk_full_predict():
        code = PATCHED.format(patch=DISK_FULL, module="pneumonia.predict")
        argv = ["-c", code, "--ckpt", str(ckpt()), str(radiograph(tmp / "one.png")),
                "--output", str(tmp / "out.csv")]  # fmt: skip
        return row(measured(argv, tmp))

    def epsilon(value: str, enabled: bool):
        def case():
            run_dir = tmp / f"dp-{value}-{enabled}"
            argv = ["-m", "pneumonia.fit", *CENTRAL, "--model.name", "se_resnet18",
                    "--model.norm", "gn", "--privacy.target_epsilon", value,
                    "--trainer.max_epochs", "1",
                    "--run_dir", str(run_dir)]  # fmt: skip
            if enabled:
                argv += ["--privacy.enabled", "true"]
            result = measured(argv, tmp)
            return row(result, f"run dir left: {run_dir.exists()}")

        return case

    # 7 left from the earlier review
    def not_utf8_name():
        root = kermany(tmp / "names")
        radiograph(Path(os.fsdecode(bytes(root / "NORMAL") + b"/IM-0098-\xff.png")), 60)
        argv = ["-m", "pneumonia.fit", *CENTRAL, "--trainer.max_epochs", "1",
                "--data.root", str(root), "--run_dir", str(tmp / "names-run")]  # fmt: skip
        return row(measured(argv, tmp))

    def duplicate_key():
        path = tmp / "twice.yaml"
        path.write_text("seed: 1\nseed: 2\n")
        argv = ["-m", "pneumonia.fit", "--config", str(path), *CENTRAL,
                "--trainer.max_epochs", "1", "--run_dir", str(tmp / "twice-run")]  # fmt: skip
        return row(measured(argv, tmp), f"run dir made: {(tmp / 'twice-run').exists()}")

    yield "1 code from a file", "script in a model card, page opened", card_script
    yield "1 code from a file", "class_path of a planted module in --config", planted_module
    yield "2 memory", "30000 x 30000 black PNG (serve)", served_bomb("png")
    yield "2 memory", "12000 x 12000 deflated 16-bit DICOM (serve)", served_bomb("dicom")
    yield "2 memory", "30000 x 30000 black PNG (predict)", predict_bomb
    yield "2 memory", "cross-origin POST, foreign Origin and Host", cross_origin
    yield "3 bad DICOM", "NumberOfFrames 'abc' (predict)", malformed(NumberOfFrames="abc")
    yield (
        "3 bad DICOM",
        "RescaleSlope NaN (predict)",
        malformed(RescaleSlope="NaN", RescaleIntercept="0"),
    )
    yield "3 bad DICOM", "NumberOfFrames 'abc' (fit, skip_corrupt)", malformed_fit
    yield "4 data destroyed", "predict --output = an input", output_is_input
    yield "4 data destroyed", "predict --cam = the input folder", cam_is_input
    yield "4 data destroyed", "fit and fit --resume on one run dir", two_writers
    yield "4 data destroyed", "federated resume, clients/client_0 a file", client_folder_lost
    yield "5 special files", "a FIFO in a predict folder", fifo
    yield "5 special files", "x.dcm -> /dev/zero in a predict folder", device_file
    yield "5 hostile sizes", "checkpoint claims width 65536", wide_checkpoint
    yield "5 hostile sizes", "ONNX metadata image_size 60000", lying_onnx
    yield "5 hostile sizes", "member predictions.csv not UTF-8", ensemble_not_utf8
    yield "6 messages", "SIGTERM as the final scoring starts", term_in_finalize
    yield "6 messages", "full disk during predict --output", disk_full_predict
    yield "6 messages", "privacy.target_epsilon 0.01, enabled", epsilon("0.01", True)
    yield "6 messages", "privacy.target_epsilon 8, not enabled", epsilon("8", False)
    yield "7 earlier", "a file name that is not UTF-8 (fit)", not_utf8_name
    yield "7 earlier", "YAML with seed twice", duplicate_key


def browser_title(url: str) -> str:
    """The page's title after it has rendered the model card, in headless Chromium (or why
    it could not be read)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        return "no chromium"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        time.sleep(3)  # the page fetches /model and renders the card
        return repr(driver.title)
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="after", help="column label (before / after)")
    parser.add_argument("--only", help="run the cases whose name contains this text")
    args = parser.parse_args()
    label = args.label
    print(f"| class | case | {label}: exit | {label}: line | {label}: on disk | {label}: cost |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="hostile-") as folder:
        for kind, name, case in cases(Path(folder)):
            if args.only and args.only not in name:
                continue
            try:
                cells = case()
            except Exception as err:  # a case that cannot run says so in its row
                cells = ("-", f"case failed: {type(err).__name__}: {err}"[:150], "", "")
            cells = [str(c).replace("|", "/").replace(folder, "$TMP") for c in cells]
            print(f"| {kind} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
