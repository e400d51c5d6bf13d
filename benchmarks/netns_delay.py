"""Delay every packet a host sends by a fixed time, where the kernel has no `netem` qdisc (this machine's has none).

Run inside a host's network namespace, after which `iptables -A OUTPUT -o eth0 -j NFQUEUE --queue-num Q
--queue-bypass` hands the host's outgoing packets to it: each is held for --delay-us from its arrival, then
accepted, in order (netem's constant delay on the host's egress; one-way latency +d, round trip +2d). It speaks
nfnetlink_queue over a raw netlink socket (no library), asks for packet metadata only, and keeps its timer slack
at 1 ns, at real-time priority (SCHED_FIFO). Precision: userspace wake-ups; `benchmarks/latency_sweep.py` measures the latency
actually reached instead of trusting --delay-us.

  python benchmarks/netns_delay.py --delay-us 500 [--queue 0]      (prints "ready" once bound)
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import os
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS = 1, 2
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGEN = struct.Struct("=BBH")  # family, version, res_id (big endian, packed by hand)
PR_SET_TIMERSLACK = 29


def _attr(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def _message(msg: int, queue: int, attrs: bytes, seq: int = 0) -> bytes:
    body = NFGEN.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, NLM_F_REQUEST, seq, 0) + body


def bind(queue: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))))
    return sock


def packet_ids(data: bytes) -> list[int]:
    """Packet ids of the NFQNL_MSG_PACKET messages in one netlink read."""
    ids, off = [], 0
    while off + NLMSG_HDR.size <= len(data):
        length, kind, _, _, _ = NLMSG_HDR.unpack_from(data, off)
        if length < NLMSG_HDR.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + NLMSG_HDR.size + NFGEN.size
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def verdict(queue: int, packet_id: int) -> bytes:
    return _message(NFQNL_MSG_VERDICT, queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)))


def run(queue: int, delay_s: float) -> None:
    ctypes.CDLL(None).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    sock = bind(queue)
    sock.setblocking(False)
    held: collections.deque[tuple[float, int]] = collections.deque()
    print("ready", flush=True)
    while True:
        timeout = max(0.0, held[0][0] - time.monotonic()) if held else None
        if timeout is None or timeout > 0:
            ready, _, _ = select.select([sock], [], [], timeout)
            if ready:
                now = time.monotonic()
                while True:
                    try:
                        data = sock.recv(1 << 16)
                    except BlockingIOError:
                        break
                    held.extend((now + delay_s, pid) for pid in packet_ids(data))
        now = time.monotonic()
        while held and held[0][0] <= now:
            sock.send(verdict(queue, held.popleft()[1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-us", type=float, required=True)
    p.add_argument("--queue", type=int, default=0)
    args = p.parse_args()
    try:  # real-time priority: its wake-ups must not wait behind the ranks (it uses little CPU)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
    except (PermissionError, OSError):
        os.nice(-10) if os.geteuid() == 0 else None
    run(args.queue, args.delay_us * 1e-6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
