"""Units of the KServe extensions without a server: shared-memory regions (what they map, what they refuse), tensors
decoded from a mix of shared memory and raw contents, trace sampling, and all-or-nothing log setting updates."""

import os
import uuid

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from trtllm_bdlora.errors import AlreadyExistsError, InternalError, NotFoundError, RequestError
from trtllm_bdlora.logs import log_switches, set_log_switches
from trtllm_bdlora.serving.kserve.control import update_log_settings
from trtllm_bdlora.serving.kserve.shm import RegionSlice, SharedMemoryRegions, region_slice
from trtllm_bdlora.serving.kserve.tensors import from_grpc, to_grpc
from trtllm_bdlora.serving.repository.trace import Tracer

pytestmark = pytest.mark.unit


@pytest.fixture
def shm_object():
    """A 256-byte POSIX shared-memory object holding fresh random bytes, and its key."""
    name = f"kx_unit_{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng().integers(1, 255, 256, dtype=np.uint8).tobytes()
    with open(f"/dev/shm/{name}", "wb") as f:
        f.write(data)
    yield f"/{name}", data
    for path in (f"/dev/shm/{name}", f"/dev/shm/{name}_link"):
        if os.path.lexists(path):
            os.unlink(path)


def test_regions_map_the_object_at_their_offset_and_refuse_what_is_not_theirs(shm_object):
    key, data = shm_object
    regions = SharedMemoryRegions()
    regions.register("r", key, 64, 128)
    assert regions.status() == [{"name": "r", "key": key, "offset": 64, "byte_size": 128}]
    assert regions.read(RegionSlice("r", 16, 8)) == data[64 + 8 : 64 + 8 + 16]
    regions.write(RegionSlice("r", 4, 120), b"\x00\x01\x02\x03", "out")
    with open(f"/dev/shm{key}", "rb") as f:
        assert f.read()[184:188] == b"\x00\x01\x02\x03"
    with pytest.raises(AlreadyExistsError):
        regions.register("r", key, 0, 8)
    with pytest.raises(RequestError, match="Invalid offset"):
        regions.read(RegionSlice("r", 16, 120))  # 8 bytes past the region's end
    with pytest.raises(RequestError, match="should be at least 5 bytes"):
        regions.write(RegionSlice("r", 4, 0), b"12345", "out")
    with pytest.raises(RequestError, match="past the end"):
        regions.register("big", key, 200, 100)
    os.symlink(f"/dev/shm{key}", f"/dev/shm{key}_link")
    with pytest.raises(InternalError, match="Unable to open"):  # as shm_open: never through a symbolic link
        regions.register("link", f"{key}_link", 0, 8)
    for bad in ("../etc/passwd", "/a/b", "/", ""):
        with pytest.raises(RequestError, match="Invalid shared memory key"):
            regions.register("bad", bad, 0, 8)
    regions.unregister()
    assert regions.status() == []
    with pytest.raises(NotFoundError):
        regions.read(RegionSlice("r", 4))


def test_tensor_parameters_name_a_region_completely_or_not_at_all():
    assert region_slice({}, "input x") is None
    assert region_slice({"shared_memory_region": "r", "shared_memory_byte_size": 8}, "x") == RegionSlice("r", 8, 0)
    for bad in ({"shared_memory_region": "r"}, {"shared_memory_byte_size": 8},
                {"shared_memory_region": "r", "shared_memory_byte_size": -1},
                {"shared_memory_region": "r", "shared_memory_byte_size": True}):
        with pytest.raises(RequestError):
            region_slice(bad, "input x")


def test_grpc_inputs_mix_shared_memory_and_raw_contents_in_order(shm_object):
    key, _ = shm_object
    rng = np.random.default_rng()
    ids, lengths, limit = (rng.integers(1, 1000, (1, 5)).astype(np.int32), np.array([[5]], np.int32),
                           rng.integers(1, 50, (1, 1)).astype(np.int32))
    regions = SharedMemoryRegions()
    regions.register("in", key, 0, 256)
    regions.write(RegionSlice("in", lengths.nbytes, 32), lengths.tobytes(), "input_lengths")
    request = pb.ModelInferRequest(model_name="tensorrt_llm")
    for name, array in (("input_ids", ids), ("input_lengths", lengths), ("request_output_len", limit)):
        request.inputs.add(name=name, datatype="INT32", shape=list(array.shape))
    request.inputs[1].parameters["shared_memory_region"].string_param = "in"
    request.inputs[1].parameters["shared_memory_byte_size"].int64_param = lengths.nbytes
    request.inputs[1].parameters["shared_memory_offset"].int64_param = 32
    request.raw_input_contents.extend([ids.tobytes(), limit.tobytes()])  # only the inputs not in shared memory
    output = request.outputs.add(name="output_ids")
    output.parameters["shared_memory_region"].string_param = "in"
    output.parameters["shared_memory_byte_size"].int64_param = 64
    output.parameters["shared_memory_offset"].int64_param = 128
    decoded = from_grpc(request, regions)
    assert [(t.name, t.array.tolist()) for t in decoded.inputs] == [
        ("input_ids", ids.tolist()), ("input_lengths", lengths.tolist()), ("request_output_len", limit.tolist())]
    out = rng.integers(1, 1000, (1, 1, 9)).astype(np.int32)
    response = to_grpc("tensorrt_llm", "", {"output_ids": out}, None, regions, decoded.output_regions)
    assert list(response.raw_output_contents) == [b""] and list(response.outputs[0].shape) == [1, 1, 9]
    assert regions.read(RegionSlice("in", out.nbytes, 128)) == out.tobytes()
    request.raw_input_contents.append(limit.tobytes())
    with pytest.raises(RequestError, match="raw_input_contents holds 3 tensors for 2 inputs"):
        from_grpc(request, regions)


def test_trace_rate_and_count_choose_the_traced_requests():
    tracer = Tracer(["ensemble", "tensorrt_llm"])
    assert tracer.sample("ensemble") is None  # OFF by default
    tracer.update("", {"trace_level": ["TIMESTAMPS"], "trace_rate": ["3"]})
    tracer.update("tensorrt_llm", {"trace_rate": ["1"], "trace_count": ["2"]})
    assert [tracer.sample("ensemble") is not None for _ in range(7)] == [True, False, False, True, False, False, True]
    assert [tracer.sample("tensorrt_llm") is not None for _ in range(4)] == [True, True, False, False]
    assert tracer.settings("tensorrt_llm")["trace_count"] == "0" and tracer.settings("")["trace_count"] == "-1"
    assert tracer.update("tensorrt_llm", {"trace_count": None, "trace_rate": None}) == tracer.settings("")


def test_a_log_update_with_one_bad_value_changes_nothing():
    set_log_switches(info=True, warning=True, error=True, verbose=0, access_lines=True)
    before = log_switches()
    with pytest.raises(RequestError, match="log_warning"):
        update_log_settings({"log_info": False, "log_access": False, "log_warning": "off"})
    assert log_switches() == before
    assert update_log_settings({"log_info": False})["log_info"] is False
    set_log_switches(info=True)
