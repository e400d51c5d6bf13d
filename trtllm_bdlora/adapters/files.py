"""Adapter files opened once, and read only from the descriptor that was checked.

An adapter directory is opened once (`AdapterDir`) and each file in it once, relative to that directory's
descriptor; nothing is opened again by path. Under `--adapter-root` (`AdapterRoot`, opened once at start-up), the
directory a client names is opened relative to the root's descriptor, and every descriptor (the directory's, each
file's) is refused unless the kernel places it beneath the root (its path in /proc/self/fd, resolved at the open:
symlinks inside the root may point anywhere inside it). A symlink swapped between a check and a read cannot
redirect the read: what is read is what was opened and checked.

Opens never block (O_NONBLOCK: a FIFO named like an adapter file is refused as not a regular file) and never make a
terminal the controlling one (O_NOCTTY).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from trtllm_bdlora.errors import AdapterError, BdLoraError, InputError, NotFoundError, PermissionDeniedError

OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
DIR_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY


def descriptor_path(fd: int) -> str:
    """Where the kernel says an open descriptor lies (symlinks resolved when it was opened)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as err:
        raise BdLoraError(f"cannot tell where an opened adapter file lies (/proc/self/fd: {err.strerror})") from None


def beneath(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def read_exactly(fd: int, offset: int, size: int, what: str) -> bytearray:
    """`size` bytes of `fd` from `offset` (a file that ends early is an error, not a short read)."""
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise AdapterError(f"{what}: the file ends at byte {offset + done}, {size - done} bytes early")
        done += n
    return buf


class AdapterRoot:
    """`--adapter-root`: the one directory tree adapters may be loaded from at run time, opened once."""

    def __init__(self, path: str | Path):
        try:
            self.fd = os.open(path, DIR_FLAGS)
        except OSError as err:
            raise BdLoraError(f"--adapter-root {path}: {err.strerror}") from None
        self.given = str(path)

    @property
    def path(self) -> Path:
        """The root's path now (where its descriptor lies)."""
        return Path(descriptor_path(self.fd))

    def check(self, fd: int, what: str) -> None:
        """PermissionDeniedError unless the opened `fd` lies beneath the root (the message shows no path)."""
        if not beneath(descriptor_path(fd), str(self.path)):
            os.close(fd)
            raise PermissionDeniedError(f"{what} is outside --adapter-root", param="lora_path")

    def open_adapter(self, lora_path: str) -> AdapterDir:
        """The adapter directory `lora_path` (relative to the root, or absolute), opened and checked."""
        root = str(self.path)
        try:
            relative = os.path.relpath(os.path.normpath(os.path.join(root, lora_path)), root)
        except ValueError:  # a NUL in the path
            raise InputError("lora_path", "cannot be resolved to a directory") from None
        if relative == ".." or relative.startswith("../"):  # plainly outside: say so before touching anything
            raise PermissionDeniedError("lora_path is outside --adapter-root", param="lora_path")
        try:
            fd = os.open(lora_path, DIR_FLAGS, dir_fd=self.fd)  # an absolute path ignores dir_fd
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError("lora_path: no such adapter directory under --adapter-root", param="lora_path") from None
        except (OSError, ValueError):  # a symlink loop, a name too long, a NUL
            raise InputError("lora_path", "cannot be resolved to a directory") from None
        self.check(fd, "lora_path")
        return AdapterDir(fd, os.path.join(root, relative), self, relative)

    def close(self) -> None:
        os.close(self.fd)


class AdapterDir:
    """An adapter directory opened once; its files are opened relative to it (beneath `root`, when given).
    `display` names it in messages (under a root, clients see the root's path hidden: errors.public_text);
    `relative` is its path under the root."""

    def __init__(self, fd: int, display: str, root: AdapterRoot | None = None, relative: str | None = None):
        self.fd, self.display, self.root, self.relative = fd, display, root, relative or display

    @classmethod
    def open(cls, path: str | Path) -> AdapterDir:
        """An operator's own directory (`--adapter`, `inspect`, `convert-adapter`): opened as named."""
        try:
            return cls(os.open(path, DIR_FLAGS), str(path))
        except OSError:
            raise AdapterError(f"{path}: adapter directory not found") from None

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def open_file(self, name: str) -> int | None:
        """A descriptor of the regular file `name` in this directory (None when there is none), checked against
        the root. The caller closes it."""
        where = f"{self.display}/{name}"
        try:
            fd = os.open(name, OPEN_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise AdapterError(f"{where}: {err.strerror}") from None
        if self.root is not None:
            self.root.check(fd, f"lora_path: {name}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise AdapterError(f"{where}: not a regular file")
        return fd

    def read_small(self, name: str, limit: int) -> bytes | None:
        """The whole of a small file (a config), refused beyond `limit` bytes before it is read."""
        fd = self.open_file(name)
        if fd is None:
            return None
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise AdapterError(f"{self.display}/{name}: {size} bytes, more than {limit} (not an adapter config)")
            return bytes(read_exactly(fd, 0, size, f"{self.display}/{name}"))
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> AdapterDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
