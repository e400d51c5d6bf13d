"""Triton's system shared-memory extension: POSIX shared-memory objects (`shm_open` names, /dev/shm) a client
registers as named regions (key, offset, byte size); an input tensor is then read from a region and a requested output
written into one, named by the tensor's `shared_memory_region`, `shared_memory_byte_size` and `shared_memory_offset`
parameters. Messages and codes as tritonserver 2.51 answers them (shared_memory_manager.cc), except where noted.

The object is opened as glibc's shm_open opens it (no symbolic links, a regular file under /dev/shm) and mapped
shared, read and write: a client that can reach the port can read and write any shared-memory object of the server's
user whose name it knows, as with Triton: keep the port local, or set --api-key."""

from __future__ import annotations

import mmap
import os
import stat
import threading
from dataclasses import dataclass

from trtllm_bdlora.errors import AlreadyExistsError, InternalError, NotFoundError, RequestError

SHM_DIR = "/dev/shm"
REGION = "shared_memory_region"
BYTE_SIZE = "shared_memory_byte_size"
OFFSET = "shared_memory_offset"


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    mapping: mmap.mmap

    def status(self) -> dict:
        return {"name": self.name, "key": self.key, "offset": self.offset, "byte_size": self.byte_size}


@dataclass(frozen=True)
class RegionSlice:
    """Where one tensor lies: `byte_size` bytes at `offset` in region `region`."""

    region: str
    byte_size: int
    offset: int = 0


def _open(key: str) -> mmap.mmap:
    name = key.removeprefix("/")
    if not name or "/" in name or name in (".", ".."):
        raise RequestError(f"Invalid shared memory key: '{key}' (a POSIX shared-memory name: '/name')")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise InternalError(f"Unable to open shared memory region: '{key}'") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            raise InternalError(f"Invalid shared memory region: '{key}'")
        return mmap.mmap(fd, info.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


class SharedMemoryRegions:
    """The registered regions (any thread)."""

    def __init__(self):
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        with self._lock:
            if name in self._regions:
                raise AlreadyExistsError(f"shared memory region '{name}' already in manager")
        for field_name, value in (("offset", offset), ("byte_size", byte_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RequestError(f"Shared memory register request's '{field_name}' must be a non-negative integer, "
                                   f"got {value!r}")
        mapping = _open(key)
        size = len(mapping)
        if offset + byte_size > size:
            mapping.close()
            raise RequestError(f"failed to register shared memory region '{name}': offset {offset} + byte_size "
                               f"{byte_size} is past the end of '{key}' ({size} bytes)")
        with self._lock:
            if name in self._regions:
                mapping.close()
                raise AlreadyExistsError(f"shared memory region '{name}' already in manager")
            self._regions[name] = Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str = "") -> None:
        """One region ("" for all); a name that is not registered is no error, as in Triton."""
        with self._lock:
            gone = list(self._regions.values()) if not name else [r for r in [self._regions.get(name)] if r]
            for region in gone:
                del self._regions[region.name]
        for region in gone:
            region.mapping.close()

    def status(self, name: str = "") -> list[dict]:
        with self._lock:
            if not name:
                return [r.status() for r in sorted(self._regions.values(), key=lambda r: r.name)]
            region = self._regions.get(name)
        if region is None:
            raise NotFoundError(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def _locate(self, where: RegionSlice) -> tuple[Region, int]:
        with self._lock:
            region = self._regions.get(where.region)
        if region is None:
            raise NotFoundError(f"Unable to find shared memory region: '{where.region}'")
        if where.offset < 0 or where.byte_size < 0 or where.offset + where.byte_size > region.byte_size:
            raise RequestError(f"Invalid offset + byte size for shared memory region: '{where.region}'")
        return region, region.offset + where.offset

    def check(self, where: RegionSlice) -> None:
        self._locate(where)

    def read(self, where: RegionSlice) -> bytes:
        region, start = self._locate(where)
        try:
            return region.mapping[start : start + where.byte_size]
        except ValueError:  # unregistered (closed) meanwhile
            raise NotFoundError(f"Unable to find shared memory region: '{where.region}'") from None

    def write(self, where: RegionSlice, data: bytes, output: str) -> None:
        if len(data) > where.byte_size:
            raise RequestError(f"shared memory size specified with the request for output '{output}' "
                               f"({where.byte_size} bytes) should be at least {len(data)} bytes to hold the results")
        region, start = self._locate(where)
        try:
            region.mapping[start : start + len(data)] = data
        except ValueError:
            raise NotFoundError(f"Unable to find shared memory region: '{where.region}'") from None


def region_slice(parameters: dict, what: str) -> RegionSlice | None:
    """The shared-memory parameters of a tensor (input or requested output), or None when it names no region."""
    name = parameters.get(REGION)
    if name is None:
        if BYTE_SIZE in parameters or OFFSET in parameters:
            raise RequestError(f"{what}: '{BYTE_SIZE}' / '{OFFSET}' given without '{REGION}'")
        return None
    if not isinstance(name, str):
        raise RequestError(f"{what}: '{REGION}' must be a string")
    values = []
    for key, default in ((BYTE_SIZE, None), (OFFSET, 0)):
        value = parameters.get(key, default)
        if value is None:
            raise RequestError(f"{what}: '{REGION}' needs '{BYTE_SIZE}'")
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise RequestError(f"{what}: '{key}' must be a non-negative integer, got {value!r}")
        values.append(value)
    return RegionSlice(name, values[0], values[1])
