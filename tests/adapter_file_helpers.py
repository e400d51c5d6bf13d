"""Hostile adapter files for the adapter-file tests: sparse safetensors that claim gigabytes, a watcher of reads
(inotify), and a process that swaps a symlink between a directory inside the adapter root and one outside."""

from __future__ import annotations

import ctypes
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

IN_ACCESS, IN_OPEN, IN_NONBLOCK = 0x1, 0x20, 0o4000
GIB = 1 << 30


def write_sparse_safetensors(path: Path, header: dict, size: int) -> Path:
    """A safetensors file of `size` bytes (sparse: no disk or memory spent) with this header."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(size)
    return path


def huge_tensor_header(size: int, rank: int, key: str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
                       ) -> dict:
    """One fp32 lora_A tensor of rank `rank` filling most of a file of `size` bytes (its input features)."""
    features = (size - 512) // (4 * rank)
    return {key: {"dtype": "F32", "shape": [rank, features], "data_offsets": [0, 4 * rank * features]}}


def sized_header(header: dict, size: int) -> dict:
    """`header` padded (in __metadata__) so that its tensors end exactly at `size` bytes."""
    data = max(v["data_offsets"][1] for v in header.values())
    raw = len(json.dumps(header).encode())
    pad = size - 8 - data - raw - len(', "__metadata__": {"pad": ""}')
    assert pad >= 0, "the header does not fit"
    return {**header, "__metadata__": {"pad": " " * pad}}


class ReadWatch:
    """inotify on files and directories: which of them were opened or read since the watch began."""

    def __init__(self, paths: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0, "inotify_init1 failed"
        self.names = {}
        for p in paths:
            wd = self.libc.inotify_add_watch(self.fd, str(p).encode(), IN_ACCESS | IN_OPEN)
            assert wd >= 0, f"inotify_add_watch {p} failed"
            self.names[wd] = p

    def events(self) -> list[tuple[str, str]]:
        """(path, "read" | "open") of every event so far."""
        out, buf = [], b""
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            buf += chunk
        i = 0
        while i + 16 <= len(buf):
            wd, mask, _, length = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16 : i + 16 + length].rstrip(b"\0").decode()
            path = str(self.names[wd] / name) if name else str(self.names[wd])
            if mask & IN_ACCESS:
                out.append((path, "read"))
            if mask & IN_OPEN:
                out.append((path, "open"))
            i += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


SWAPPER = """
import os, sys, time
link, a, b = sys.argv[1:4]
tmp, i = link + ".swap", 0
while True:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink((a, b)[i % 2], tmp)
    os.replace(tmp, link)
    i += 1
    time.sleep(0.0002)  # about as long in each state, however the scheduler treats this process
"""


class SymlinkSwapper:
    """A process that swaps `link` atomically (a rename over it) between pointing at `a` and at `b`, as fast as it
    can (its own process: no interpreter lock shared with the loads it races)."""

    def __init__(self, link: Path, a: str, b: str):
        link.symlink_to(a)
        self.proc = subprocess.Popen([sys.executable, "-c", SWAPPER, str(link), a, b])
        deadline = time.monotonic() + 60
        while os.readlink(link) != b:  # swapping has begun
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("the symlink swapper did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
