"""What a decoder raises for a file it refuses: shared by the generic decoder
(`pneumonia.data.decode`) and the DICOM one (`pneumonia.data.dicom`), which decode imports
lazily, so that imports among pneumonia.data flow one way."""

from __future__ import annotations


class CorruptImageError(Exception):
    """A file that is not a readable image (args: its path, and why if known)."""


class ImageTooLarge(CorruptImageError):
    """An image whose header promises more than the decode budget (pixels, frames, bytes):
    refused before its pixels are materialised (args: its path, and why)."""
