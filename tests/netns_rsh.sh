#!/bin/sh
# mpirun's launch agent for the test hosts of tests/netns_hosts.py (`--mca plm_rsh_agent` points here), used as
# ssh would be: `netns_rsh.sh HOST COMMAND...` runs COMMAND, a shell command line, on HOST. HOST is a network
# namespace; the command runs inside it with HOST as its hostname (its own UTS namespace) and with HOST's own files
# bind-mounted over the shared ones (lines "SOURCE TARGET" in $NETNS_HOSTS_STATE/HOST.mounts), so that each host
# has its own network, name and files, as separate machines have.
# This script stays behind in the caller's namespace, as an ssh client does on the calling machine: when the
# remote command dies of a signal (its host was killed) it exits 255, as ssh does when the connection drops.
set -u
host="$1"
shift
ip netns exec "$host" unshare --uts sh -c '
    host="$1"; shift
    hostname "$host"
    mounts="${NETNS_HOSTS_STATE:-/nonexistent}/$host.mounts"
    if [ -f "$mounts" ]; then
        while read -r source target; do mount --bind "$source" "$target"; done < "$mounts"
    fi
    exec sh -c "$*"' netns_rsh "$host" "$@"
rc=$?
[ "$rc" -gt 128 ] && exit 255
exit "$rc"
