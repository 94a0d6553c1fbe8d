"""A minimal JPEG lossless (ITU-T T.81 process 14, Huffman, one component) encoder, for test data only.

No installed package encodes JPEG lossless (pydicom has no encoder for 1.2.840.10008.1.2.4.57/.70, and
pylibjpeg-libjpeg only decodes), so the tests write the codestream themselves and let libjpeg (through pydicom)
decode it: a frame that decodes to the original values shows both that the reader handles the syntax and that this
encoder is right. Predictors 1-7 (selection value), point transform 0, no restart intervals.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["encode_jpeg_lossless"]

# a Huffman table coding the 17 difference categories (SSSS 0..16) in 5 bits each: code = category
_BITS = [0, 0, 0, 0, 17] + [0] * 11
_HUFFVAL = list(range(17))


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", marker, len(payload) + 2) + payload


def _predict(img: np.ndarray, predictor: int, precision: int) -> np.ndarray:
    """The prediction of every sample (T.81 H.1.2.1): first row from the left, first column from above."""
    x = img.astype(np.int64)
    ra = np.zeros_like(x)
    rb = np.zeros_like(x)
    rc = np.zeros_like(x)
    ra[:, 1:] = x[:, :-1]
    rb[1:, :] = x[:-1, :]
    rc[1:, 1:] = x[:-1, :-1]
    px = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor].copy()
    px[0, 1:] = x[0, :-1]  # first row: left neighbour
    px[1:, 0] = x[:-1, 0]  # first column: the sample above
    px[0, 0] = 1 << (precision - 1)
    return px


def encode_jpeg_lossless(img: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """One frame ``(rows, columns)`` of unsigned integers < 2**precision as a JPEG lossless codestream."""
    img = np.asarray(img)
    if img.ndim != 2 or img.min() < 0 or img.max() >= 1 << precision:
        raise ValueError("expected a 2D frame of unsigned values within the precision")
    rows, cols = img.shape
    diff = (img.astype(np.int64) - _predict(img, predictor, precision)) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()  # T.81 H.1.2.1: modulo 2**16
    bits: list[str] = []
    for d in diff.tolist():
        ssss = 0 if d == 0 else int(abs(d)).bit_length()
        bits.append(format(ssss, "05b"))
        if 0 < ssss < 16:  # category 16 (difference 32768) has no extra bits
            extra = d if d > 0 else d - 1
            bits.append(format(extra & ((1 << ssss) - 1), f"0{ssss}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with 1-bits
    data = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        data.append(byte)
        if byte == 0xFF:
            data.append(0x00)  # byte stuffing
    sof3 = struct.pack(">BHHB", precision, rows, cols, 1) + bytes([1, 0x11, 0])
    dht = bytes([0x00]) + bytes(_BITS) + bytes(_HUFFVAL)
    sos = bytes([1, 1, 0x00, predictor, 0, 0])
    return (
        b"\xff\xd8" + _segment(0xFFC3, sof3) + _segment(0xFFC4, dht) + _segment(0xFFDA, sos) + bytes(data) + b"\xff\xd9"
    )
