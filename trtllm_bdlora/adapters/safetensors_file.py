"""A safetensors file read from an open descriptor: the header parsed and checked here, before any tensor is read.

Format (huggingface/safetensors): 8 bytes, little-endian u64 N; N bytes of JSON, an object mapping each tensor name
to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the data that follows the header), plus an
optional "__metadata__" object of strings; then the data. A well-formed file's tensors tile the data exactly, in
order, with no gap, overlap or trailing bytes, and each one's byte size is its element count times its dtype's
size. Everything is checked from the header alone, then only the tensors the caller accepted are read, each into
a buffer of its own validated size: a header that claims more than the file holds, or more than the caller allows,
is refused before any memory is spent on it. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch

from trtllm_bdlora.adapters.files import read_exactly
from trtllm_bdlora.errors import AdapterError

MAX_HEADER_BYTES = 16 << 20  # an adapter of 80 layers x 7 modules x 2 factors has a header of about 200 KB
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
OTHER_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
                "I64": 8, "U64": 8}
ITEM_SIZE = {**{k: v.itemsize for k, v in FLOAT_DTYPES.items()}, **OTHER_DTYPES}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # the safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"a key appears twice ({sorted(k for k in set(keys) if keys.count(k) > 1)[0]!r})")
    return dict(pairs)


def read_header(fd: int, what: str, max_header_bytes: int = MAX_HEADER_BYTES) -> list[TensorEntry]:
    """The tensors a safetensors file declares, in file order, checked for consistency with the file's size;
    AdapterError (one line, naming `what`) for anything else. Reads at most 8 + `max_header_bytes` bytes."""
    size = os.fstat(fd).st_size
    if size < 8:
        raise AdapterError(f"{what}: unreadable safetensors (a {size}-byte file has no header)")
    (n,) = struct.unpack("<Q", read_exactly(fd, 0, 8, what))
    if n > min(max_header_bytes, size - 8):
        raise AdapterError(f"{what}: unreadable safetensors (header of {n} bytes, more than "
                           f"{'the file holds' if n > size - 8 else f'{max_header_bytes} bytes'})")
    try:
        header = json.loads(bytes(read_exactly(fd, 8, n, what)).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{what}: unreadable safetensors (header is not valid JSON: {err})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{what}: unreadable safetensors (header is not a JSON object)")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterError(f"{what}: unreadable safetensors (__metadata__ must map names to strings)")
    data_start = 8 + n
    entries = [_entry(what, name, info, data_start) for name, info in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    at = data_start
    for e in entries:
        if e.begin != at:
            raise AdapterError(f"{what}: unreadable safetensors (tensor {e.name!r} starts at data offset "
                               f"{e.begin - data_start}, expected {at - data_start}: overlap or gap)")
        at = e.end
    if at != size:
        raise AdapterError(f"{what}: unreadable safetensors (the header describes {at - data_start} bytes of data, "
                           f"the file holds {size - data_start})")
    return entries


def _entry(what: str, name: str, info, data_start: int) -> TensorEntry:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterError(f"{what}: unreadable safetensors (tensor {name!r}: expected dtype, shape, data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in ITEM_SIZE:
        raise AdapterError(f"{what}: unreadable safetensors (tensor {name!r}: unknown dtype {dtype!r})")

    def is_count(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise AdapterError(f"{what}: unreadable safetensors (tensor {name!r}: shape {shape!r})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise AdapterError(f"{what}: unreadable safetensors (tensor {name!r}: data_offsets {offsets!r})")
    entry = TensorEntry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
    if offsets[1] < offsets[0] or offsets[1] - offsets[0] != entry.numel * ITEM_SIZE[dtype]:
        raise AdapterError(f"{what}: unreadable safetensors (tensor {name!r}: {dtype} {list(shape)} is "
                           f"{entry.numel * ITEM_SIZE[dtype]} bytes, its data_offsets {offsets} span "
                           f"{offsets[1] - offsets[0]})")
    return entry


def read_tensor(fd: int, entry: TensorEntry, what: str) -> torch.Tensor:
    """One float tensor whose entry was checked, read from `fd` into a buffer of exactly its size."""
    dtype = FLOAT_DTYPES.get(entry.dtype)
    if dtype is None:
        raise AdapterError(f"{what}: {entry.name} has non-float dtype {entry.dtype}")
    if entry.numel == 0:
        return torch.empty(entry.shape, dtype=dtype)
    buf = read_exactly(fd, entry.begin, entry.end - entry.begin, what)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry.shape)
