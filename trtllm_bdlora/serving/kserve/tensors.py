"""KServe v2 tensors on the wire (gRPC protobuf, HTTP JSON with the binary-data extension, system shared memory) to
and from numpy, with one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from trtllm_bdlora.errors import InputError, RequestError
from trtllm_bdlora.serving.edge.payload import parse_json
from trtllm_bdlora.serving.kserve.shm import REGION, RegionSlice, SharedMemoryRegions, region_slice
from trtllm_bdlora.serving.repository.calls import InferRequest, WireTensor

CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}


# ---------------------------------------------------------------------------- decoding
MAX_ELEMENTS = 1 << 31  # a declared shape larger than this is refused before anything is allocated


def array_from_bytes(data: bytes, datatype: str, shape: list[int], name: str) -> np.ndarray:
    """A raw tensor (gRPC raw_input_contents, HTTP binary data); a byte size that does not match the shape and
    the data type is a one-line RequestError."""
    count = _element_count(shape, name)
    if datatype == "BYTES":
        array = _bytes_elements(data, name)
    else:
        dtype = np.dtype(np.uint16) if datatype == "BF16" else triton_to_np_dtype(datatype)
        if dtype is None:
            raise RequestError(f"input {name}: unsupported data type {datatype!r}")
        itemsize = np.dtype(dtype).itemsize
        if len(data) != count * itemsize:
            raise RequestError(f"input {name}: {len(data)} bytes of {datatype} data for shape {shape}, "
                               f"which needs {count * itemsize}")
        array = np.frombuffer(data, dtype=dtype)
        if datatype == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
    return _shaped(array, shape, name)


def _bytes_elements(data: bytes, name: str) -> np.ndarray:
    if not data:
        return np.array([], dtype=object)
    try:
        return deserialize_bytes_tensor(data)
    except Exception:  # noqa: BLE001 - struct.error, ValueError...: the client's data, not a server fault
        raise RequestError(f"input {name}: malformed BYTES data (each element is a 4-byte little-endian length, "
                           "then that many bytes)") from None


def _element_count(shape: list[int], name: str) -> int:
    if any(not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape):
        raise RequestError(f"input {name}: shape {shape} must be non-negative integers")
    count = math.prod(shape)
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # even an empty tensor: numpy cannot hold such a shape
        raise RequestError(f"input {name}: shape {shape} has {count} elements, more than {MAX_ELEMENTS}")
    return count


def _shaped(array: np.ndarray, shape: list[int], name: str) -> np.ndarray:
    if _element_count(shape, name) != array.size:
        raise RequestError(f"input {name}: shape {shape} does not match its {array.size} elements")
    return array.reshape(shape)


def grpc_parameters(parameters) -> dict:
    """A protobuf parameter map as a dict of Python values."""
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in parameters.items()
            if v.WhichOneof("parameter_choice")}


def _from_region(regions: SharedMemoryRegions | None, where: RegionSlice, datatype: str, shape: list[int],
                 name: str) -> np.ndarray:
    if regions is None:
        raise RequestError(f"input {name}: shared memory is not served on this endpoint")
    return array_from_bytes(regions.read(where), datatype, shape, name)


def _output_regions(requested: list[tuple[str, dict]], regions: SharedMemoryRegions | None) -> dict[str, RegionSlice]:
    """Requested outputs that go to shared memory, each checked against its region."""
    placed = {}
    for name, parameters in requested:
        where = region_slice(parameters, f"output {name}")
        if where is not None:
            if regions is None:
                raise RequestError(f"output {name}: shared memory is not served on this endpoint")
            regions.check(where)
            placed[name] = where
    return placed


def from_grpc(request: pb.ModelInferRequest, regions: SharedMemoryRegions | None = None) -> InferRequest:
    """Inputs from raw_input_contents (one per input not in shared memory, in order), the typed contents, or a
    shared-memory region."""
    raw = list(request.raw_input_contents)
    in_shm = [region_slice(grpc_parameters(t.parameters), f"input {t.name}") for t in request.inputs]
    if raw and len(raw) != sum(where is None for where in in_shm):
        raise RequestError(f"raw_input_contents holds {len(raw)} tensors for "
                           f"{sum(where is None for where in in_shm)} inputs not in shared memory")
    tensors, next_raw = [], 0
    for t, where in zip(request.inputs, in_shm):
        shape = list(t.shape)
        if where is not None:
            array = _from_region(regions, where, t.datatype, shape, t.name)
        elif raw:
            array = array_from_bytes(raw[next_raw], t.datatype, shape, t.name)
            next_raw += 1
        else:
            field_name = CONTENTS_FIELD.get(t.datatype)
            if field_name is None:
                raise RequestError(f"input {t.name}: send {t.datatype} as raw_input_contents")
            values = list(getattr(t.contents, field_name))
            dtype = object if t.datatype == "BYTES" else triton_to_np_dtype(t.datatype)
            array = _shaped(np.array(values, dtype=dtype), shape, t.name)
        tensors.append(WireTensor(t.name, t.datatype, shape, array))
    outputs = [o.name for o in request.outputs] or None
    placed = _output_regions([(o.name, grpc_parameters(o.parameters)) for o in request.outputs], regions)
    return InferRequest(request.model_name, request.id, tensors, outputs, True, grpc_parameters(request.parameters),
                        placed)


def from_http(model: str, body: bytes, header_length: int | None, regions: SharedMemoryRegions | None = None
              ) -> InferRequest:
    if header_length is not None and not 0 <= header_length <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {header_length} is outside the body's {len(body)} bytes")
    head, binary = (body, b"") if header_length is None else (body[:header_length], body[header_length:])
    doc = parse_json(head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise RequestError("request JSON must be an object with an 'inputs' list")
    tensors, offset = [], 0
    for t in doc["inputs"]:
        if not isinstance(t, dict):
            raise RequestError("every input must be a JSON object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not isinstance(shape, list):
            raise RequestError("every input needs 'name', 'datatype' and 'shape'")
        parameters = json_object(t.get("parameters"), f"input {name}: parameters")
        size = parameters.get("binary_data_size")
        where = region_slice(parameters, f"input {name}")
        given = [what for what, present in (("'data'", "data" in t), ("'binary_data_size'", size is not None),
                                            (f"'{REGION}'", where is not None)) if present]
        if len(given) > 1:
            raise RequestError(f"input {name}: set only one of 'data', 'binary_data_size' or '{REGION}' (got "
                               f"{' and '.join(given)})")
        if where is not None:
            array = _from_region(regions, where, datatype, shape, name)
        elif size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RequestError(f"input {name}: binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(binary):
                raise RequestError(f"input {name}: binary_data_size {size} runs past the request body")
            array = array_from_bytes(binary[offset : offset + size], datatype, shape, name)
            offset += size
        else:
            array = json_array(t.get("data"), datatype, shape, name)
        tensors.append(WireTensor(name, datatype, shape, array))
    params = json_object(doc.get("parameters"), "parameters")
    requested = doc.get("outputs")
    if requested is not None and not (isinstance(requested, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested)):
        raise RequestError("'outputs' must be a list of objects with a 'name'")
    outputs = [o["name"] for o in requested] if requested else None
    out_parameters = [(o["name"], json_object(o.get("parameters"), f"output {o['name']}: parameters")) for o in requested or ()]
    placed = _output_regions(out_parameters, regions)
    for name, parameters in out_parameters:
        if name in placed and parameters.get("binary_data"):
            raise RequestError(f"output {name}: set only one of '{REGION}' and 'binary_data'")
    binary_outputs: set[str] | bool = bool(params.get("binary_data_output", False))
    if requested:
        binary_outputs = {name for name, parameters in out_parameters if parameters.get("binary_data")}
    request_id = doc.get("id", "")
    if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
        raise RequestError(f"'id' must be a string, got {request_id!r}")
    return InferRequest(model, str(request_id), tensors, outputs, binary_outputs, params, placed)


def json_object(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object")
    return value


def within_range(cast: np.ndarray, source: np.ndarray, datatype: str, name: str) -> np.ndarray:
    """`cast` (JSON numbers as `datatype`), unless a finite number of `source` became infinite in it (numpy casts
    1e300 to FP32 as inf, with a warning): then a one-line InputError."""
    inf = np.isinf(cast) if cast.dtype.kind == "f" else None
    if inf is not None and inf.any():
        over = inf & np.isfinite(source)
        if over.any():
            raise InputError(name, f"must be within {datatype}'s range (±{float(np.finfo(cast.dtype).max):.4g}), "
                                   f"got {float(source[over].flat[0]):g}")
    return cast


def json_array(data, datatype: str, shape: list[int], name: str) -> np.ndarray:
    if data is None:
        raise RequestError(f"input {name}: no data")
    if datatype == "BYTES":
        flat = np.array(data, dtype=object).reshape(-1)
        array = np.array([v.encode() if isinstance(v, str) else v for v in flat], dtype=object)
    else:
        dtype = triton_to_np_dtype(datatype)
        if dtype is None or datatype == "BF16":
            raise RequestError(f"input {name}: send {datatype} as binary data")
        try:
            source = np.array(data)
            if source.dtype.kind not in "biuf":  # JSON strings ("0.7") are not numbers, as Triton parses them
                raise ValueError
            with np.errstate(over="ignore"):
                array = np.array(data, dtype=dtype)  # from the JSON values: an integer out of range raises, never wraps
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"input {name}: data is not {datatype}") from None
        array = within_range(array, source, datatype, name)
    return _shaped(array.reshape(-1), shape, name)


# ---------------------------------------------------------------------------- encoding
def wire_datatype(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in "SU":
        return "BYTES"
    return {"bool": "BOOL", "uint8": "UINT8", "int32": "INT32", "int64": "INT64", "uint64": "UINT64",
            "float16": "FP16", "float32": "FP32", "float64": "FP64"}[array.dtype.name]


def array_bytes(array: np.ndarray) -> bytes:
    if wire_datatype(array) == "BYTES":
        flat = np.array([v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)], dtype=object)
        return serialize_byte_tensor(flat).item() if flat.size else b""
    return np.ascontiguousarray(array).tobytes()


def to_grpc(model: str, request_id: str, outputs: dict[str, np.ndarray], final: bool | None = None,
            regions: SharedMemoryRegions | None = None, placed: dict[str, RegionSlice] | None = None,
            parameters: dict | None = None) -> pb.ModelInferResponse:
    """The response, with the model's response `parameters`; an output in `placed` is written to its shared-memory
    region and sent without data (an empty raw_output_contents entry keeps the others in place, as Triton sends it)."""
    response = pb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    for key, value in (parameters or {}).items():
        field_name = "bool_param" if isinstance(value, bool) else "int64_param" if isinstance(value, int) else "string_param"
        setattr(response.parameters[key], field_name, value)
    for name, array in outputs.items():
        response.outputs.add(name=name, datatype=wire_datatype(array), shape=list(array.shape))
        data = array_bytes(array)
        if placed and name in placed:
            regions.write(placed[name], data, name)
            data = b""
        response.raw_output_contents.append(data)
    if final is not None:
        response.parameters["triton_final_response"].bool_param = final
    return response


def to_http(model: str, request_id: str, outputs: dict[str, np.ndarray], binary: set[str] | bool,
            regions: SharedMemoryRegions | None = None, placed: dict[str, RegionSlice] | None = None,
            parameters: dict | None = None) -> tuple[bytes, int | None]:
    """(body, JSON header length or None when the body is plain JSON), with the model's response `parameters`; an
    output in `placed` is written to its shared-memory region and listed without data."""
    doc_outputs, chunks = [], []
    for name, array in outputs.items():
        entry = {"name": name, "datatype": wire_datatype(array), "shape": list(array.shape)}
        if placed and name in placed:
            regions.write(placed[name], array_bytes(array), name)
        elif binary is True or (isinstance(binary, set) and name in binary):
            data = array_bytes(array)
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        elif entry["datatype"] == "BYTES":
            entry["data"] = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
                             for v in array.reshape(-1)]
        else:
            entry["data"] = array.reshape(-1).tolist()
        doc_outputs.append(entry)
    doc = {"model_name": model, "model_version": "1"}
    if request_id:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = parameters
    doc["outputs"] = doc_outputs
    head = json.dumps(doc).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
