"""Process-level observations for the reliability tests: a process tree, its sockets (from /proc/net), its RSS."""

from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable
from pathlib import Path


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def _address(hex_addr: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    ip, port = hex_addr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1]), int(port, 16)
    # /proc/net/tcp6 prints the address as four host-order 32-bit words
    return ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))), int(port, 16)


def inet_sockets(pids: list[int]) -> list[dict]:
    """Every TCP/UDP socket (v4 and v6) the processes hold: {pid, proto, address, port, listening}."""
    table = {}
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            address, port = _address(fields[1])
            table[int(fields[9])] = {"proto": proto, "address": address, "port": port,
                                     "listening": proto.startswith("tcp") and fields[3] == "0A"}
    return [dict(table[inode], pid=pid) for pid in pids for inode in _socket_inodes(pid) if inode in table]


def is_loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until none of `pids` runs; returns those still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def rank_processes(match: Callable[[list[bytes], list[bytes]], bool]) -> dict[int, int]:
    """rank -> pid of the rank processes (this package's launcher or mpirun) whose command line and environment
    (both split on NUL) satisfy `match`."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if not match(cmd, env):
            continue
        for var in env:
            if var.startswith((b"TRTLLM_BDLORA_RANK=", b"OMPI_COMM_WORLD_RANK=")):
                ranks[int(var.split(b"=")[1])] = int(entry.name)
    return ranks


def marked_processes(marker: str) -> dict[int, int]:
    """rank -> pid of the rank processes whose environment holds `marker` (set by the test that started them)."""
    return rank_processes(lambda cmd, env: marker.encode() in env)


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of `pid` whose remote end is `port` (e.g. a rank's clients of rank 0's store)."""
    inodes = _socket_inodes(pid)
    count = 0
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and _address(fields[2])[1] == port and int(fields[9]) in inodes:
                count += 1
    return count


def store_port(pid: int) -> int:
    """The rendezvous store port a rank of this package's launcher was given (TRTLLM_BDLORA_STORE)."""
    for var in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if var.startswith(b"TRTLLM_BDLORA_STORE="):
            return int(var.split(b":")[-1])
    raise RuntimeError(f"pid {pid} is no rank of this package's launcher")


def wait_heartbeat(pid: int, timeout: float = 120) -> None:
    """Until the rank `pid` has opened its heartbeat's own connection to the store (its second one)."""
    port = store_port(pid)
    deadline = time.monotonic() + timeout
    while connections_to(pid, port) < 2:
        if time.monotonic() > deadline or not alive(pid):
            raise TimeoutError(f"rank pid {pid} did not connect its heartbeat to the store on port {port}")
        time.sleep(0.1)
    time.sleep(0.5)
