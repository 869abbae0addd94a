"""Reads safetensors files into numpy (memory-mapped), checking every offset against the file size.

The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape,
data_offsets}}, then the raw bytes. bfloat16 comes from ml_dtypes (a jax dependency).
"""

import json
import os
import struct

import ml_dtypes
import numpy as np

from folojax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only memory-mapped numpy arrays."""
    path = os.fspath(path)
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({file_size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if 8 + header_len > file_size:
            raise CheckpointError(
                f"{path}: truncated or corrupt (header claims {header_len} bytes, file has "
                f"{file_size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {shape} needs {expected} bytes, header gives "
                f"{end - begin}"
            )
        if data_start + end > file_size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has "
                f"{file_size}"
            )
        tensors[name] = buffer[data_start + begin:data_start + end].view(dtype).reshape(shape)
    return tensors
