"""Adapter files opened once, beneath the root, and bounded before they are read (adapters/files.py,
adapters/safetensors_file.py, the PEFT loader): a symlink swapped in a loop during 60 loads never makes a load read
outside --adapter-root; a 10 GB sparse adapter_model.safetensors is refused with peak RSS up under 100 MB, whatever
its header claims; a malformed header is one line; the tensors read equal safetensors' own reader's."""

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_file_helpers import GIB, huge_tensor_header, sized_header, write_sparse_safetensors
from tests.measure_adapter_root_race import RANK, SHAPE, race, write_adapter
from trtllm_bdlora.adapters import load_peft_adapter
from trtllm_bdlora.adapters.files import AdapterDir
from trtllm_bdlora.adapters.safetensors_file import read_header, read_tensor
from trtllm_bdlora.adapters.trtllm_format import check_request_adapter
from trtllm_bdlora.errors import AdapterError

pytestmark = pytest.mark.unit
LIMITS = {"model_shape": SHAPE, "max_lora_rank": 64, "max_elements": (1 << 30) // 4}  # serve's defaults, TP 1, fp32


@pytest.mark.parametrize("mode", ["dir", "file"])
def test_a_symlink_swapped_during_60_loads_never_makes_a_load_read_outside_the_root(mode, tmp_path):
    """`dir`: the adapter directory is the swapped symlink; `file`: its weights file is. The swapper spends about as
    long pointing inside as outside, so loads meet both (refused, or served the inside adapter)."""
    result = race(tmp_path, 60, mode)
    print(f"ADAPTER_ROOT_RACE {json.dumps(result)}")
    assert result["outside"] == 0 and result["neither"] == 0 and result["outside_file_reads"] == 0, result
    assert result["inside"] + result["refused"] == 60 and result["refused"] > 0, result
    assert all("outside --adapter-root" in reason for reason in result["refusals"]), result


def _peak_rss_growth(call) -> int:
    """Peak RSS growth (bytes) of this process during `call` (the kernel's high-water mark, reset first)."""
    def hwm() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = hwm()
    call()
    return hwm() - before


def _adapter_dir(tmp_path: Path, name: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj", "down_proj"]}))
    return directory


def _sparse_cases(tmp_path: Path) -> dict[str, Path]:
    size = 10 * GIB
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {}
    d = _adapter_dir(tmp_path, "one_huge_tensor")  # a module 10 GB wide
    write_sparse_safetensors(d / "adapter_model.safetensors", sized_header(huge_tensor_header(size, RANK, key), size), size)
    cases[d.name] = d
    d = _adapter_dir(tmp_path, "huge_header")  # the length field claims a 10 GB header
    with open(d / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", size - 8) + b"{")
        f.truncate(size)
    cases[d.name] = d
    d = _adapter_dir(tmp_path, "trailing_data")  # a valid small header, then 10 GB of nothing
    write_sparse_safetensors(d / "adapter_model.safetensors",
                             {key: {"dtype": "F32", "shape": [RANK, 64], "data_offsets": [0, RANK * 64 * 4]}}, size)
    cases[d.name] = d
    d = _adapter_dir(tmp_path, "many_layers")  # each tensor small, but 5000 layers where the model has 2
    header = {}
    at = 0
    for layer in range(5000):
        n = RANK * 64 * 4
        header[f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight"] = {
            "dtype": "F32", "shape": [RANK, 64], "data_offsets": [at, at + n]}
        at += n
    write_sparse_safetensors(d / "adapter_model.safetensors", header, 8 + len(json.dumps(header)) + at)
    cases[d.name] = d
    return cases


def test_a_10_gb_sparse_adapter_is_refused_with_memory_flat(tmp_path):
    def refusal(directory: Path, out: dict) -> None:
        with pytest.raises(AdapterError) as err:
            load_peft_adapter(directory, **LIMITS)
        out["message"] = str(err.value)

    for name, directory in _sparse_cases(tmp_path).items():
        info: dict = {}
        growth = _peak_rss_growth(lambda d=directory, out=info: refusal(d, out))
        print(f"SPARSE {name}: peak RSS +{growth / 2**20:.1f} MiB: {info['message']}")
        assert growth < 100 * 2**20, (name, growth)
        assert "\n" not in info["message"] and str(directory / "adapter_model.safetensors") in info["message"]


def test_every_bound_is_checked_before_reading(tmp_path):
    """Limits from the header alone: over --max-lora-rank, over the configured r, over the model's module, over
    the host cache; each refused in one line naming the tensor, with no tensor read (the data is never there)."""
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def refused(shape, limits, *words, r=RANK):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 8}))
        n = 4 * int(np.prod(shape))
        write_sparse_safetensors(d / "adapter_model.safetensors",
                                 {key: {"dtype": "F32", "shape": shape, "data_offsets": [0, n]}},
                                 8 + len(json.dumps({key: {"dtype": "F32", "shape": shape, "data_offsets": [0, n]}})) + n)
        with pytest.raises(AdapterError) as err:
            load_peft_adapter(d, **limits)
        assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)

    refused([128, 64], dict(LIMITS, max_lora_rank=64), "layer 0 q_proj has rank 128, over --max-lora-rank 64",
            "refused before reading", r=128)
    refused([2 * RANK, 64], LIMITS, key, f"rank <= {RANK}")
    refused([RANK, 65], LIMITS, key, "in <= 64")
    refused([RANK, 64], dict(LIMITS, max_elements=RANK * 64 - 1), "host LoRA cache")
    refused([RANK, 64, 1], LIMITS, "must be 2-D")


HEADER_CASES = {
    "duplicate key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', 4, "appears twice"),
    "overlap": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8, "overlap or gap"),
    "size mismatch": (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', 8, "span"),
    "unknown dtype": (b'{"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}', 16, "unknown dtype"),
    "negative shape": (b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', 4, "shape"),
    "data past the end": (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', 8, "the file holds"),
    "not an object": (b"[1, 2]", 0, "not a JSON object"),
    "not JSON": (b"{nope", 0, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_malformed_headers_are_one_line(case, tmp_path):
    raw, data, fragment = HEADER_CASES[case]
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(AdapterError) as err:
            read_header(fd, str(path))
    finally:
        os.close(fd)
    assert fragment in str(err.value) and "unreadable safetensors" in str(err.value) and "\n" not in str(err.value)


def test_tensors_read_from_the_descriptor_equal_safetensors_own_reader(tmp_path):
    gen = torch.Generator().manual_seed(7)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(4, generator=gen).to(torch.bfloat16),
               "c": torch.randn(2, 2, generator=gen).to(torch.float16), "d": torch.randn(0, 3, generator=gen),
               "e": torch.randn(6, generator=gen).double()}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = {e.name: read_tensor(fd, e, str(path)) for e in read_header(fd, str(path))}
    finally:
        os.close(fd)
    assert set(got) == set(reference)
    for name, tensor in reference.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def test_adapter_read_equals_its_files(tmp_path):
    written = write_adapter(tmp_path / "a", seed=3)
    adapter = load_peft_adapter(tmp_path / "a", **LIMITS)
    for (layer, name), f in adapter.modules.items():
        parent = "self_attn" if name == "q_proj" else "mlp"
        key = f"base_model.model.model.layers.{layer}.{parent}.{name}"
        assert torch.equal(f.a, written[f"{key}.lora_A.weight"]) and torch.equal(f.b, written[f"{key}.lora_B.weight"])


def test_a_config_file_beyond_its_bound_is_not_read(tmp_path):
    directory = tmp_path / "a"
    write_adapter(directory, seed=4)
    with open(directory / "adapter_config.json", "ab") as f:
        f.truncate(10 * GIB)
    growth = _peak_rss_growth(lambda: pytest.raises(AdapterError, load_peft_adapter, directory, **LIMITS))
    assert growth < 100 * 2**20


def test_a_fifo_is_no_adapter_file(tmp_path):
    directory = tmp_path / "a"
    write_adapter(directory, seed=5)
    (directory / "adapter_model.safetensors").unlink()
    os.mkfifo(directory / "adapter_model.safetensors")  # opening it must not block
    with AdapterDir.open(directory) as adir, pytest.raises(AdapterError, match="not a regular file"):
        adir.open_file("adapter_model.safetensors")


def test_request_adapters_are_bounded_before_their_values_are_read():
    """A request's lora_config is checked against --max-lora-rank and the host cache before its weights are
    hashed, converted or copied."""
    rows = np.array([[[1, 0, RANK], [6, 1, RANK]]], np.int32)  # q_proj layer 0, down_proj layer 1
    width = RANK * (64 + 128)
    weights = np.zeros((1, 2, width), np.float16)
    check_request_adapter(weights, rows, SHAPE, 64, 10**6)
    with pytest.raises(AdapterError, match="host LoRA cache"):
        check_request_adapter(weights, rows, SHAPE, 64, RANK * (64 + 64) + RANK * (128 + 64) - 1)
    with pytest.raises(AdapterError, match="exceeds --max-lora-rank 2"):
        check_request_adapter(weights, rows, SHAPE, 2, 10**6)
    # at TP 2 a dense block-diagonal factor keeps half its values: what could fit an empty cache is not refused here
    values = RANK * (64 + 64) + RANK * (128 + 64)
    check_request_adapter(weights, rows, SHAPE, 64, values // 2, tp=2)
    with pytest.raises(AdapterError, match=r"at least 1/2 of them kept.*host LoRA cache"):
        check_request_adapter(weights, rows, SHAPE, 64, values // 2 - 1, tp=2)
