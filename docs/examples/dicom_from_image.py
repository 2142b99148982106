"""Wrap a JPEG or PNG radiograph into a DICOM file, as a scanner might write it: 12-bit pixels
with a rescale slope and intercept and a window, MONOCHROME1 (dense = dark) if asked.

    python docs/examples/dicom_from_image.py IMAGE OUT.dcm [--monochrome1]

For trying `pneumonia.predict` and `pneumonia.serve` on DICOM input: the package reads such a
file back to the radiograph (modality LUT, window, inversion), close to the source image.
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--monochrome1", action="store_true")
    args = parser.parse_args()
    grey = np.asarray(Image.open(args.image).convert("L"), dtype=np.float64)
    # Stored values: 8-bit grey spread over 12 bits; stored * 2 - 1024 are the modality
    # values, and the window (c 1024, w 4096) maps them back onto the display range.
    stored = np.round(grey / 255 * 4095).astype(np.uint16)
    if args.monochrome1:
        stored = 4095 - stored
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if args.monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.WindowCenter, ds.WindowWidth = 3071, 8190
    ds.PixelData = stored.tobytes()
    ds.save_as(args.out, enforce_file_format=True)
    print(f"wrote {args.out}: {ds.Columns}x{ds.Rows}, {ds.PhotometricInterpretation}, 12-bit")


if __name__ == "__main__":
    main()
