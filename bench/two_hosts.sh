#!/usr/bin/env bash
# Two hosts on one machine: runs `mpirun MPIRUN_ARGS...` (Open MPI) across the hosts nodeA and
# nodeB. mpirun reaches them through a stand-in remote shell (bench/two_hosts_agent.sh, its
# plm_ssh_agent) that starts each host's daemon here, in a UTS namespace of its own (its own
# host name); the two names resolve to loopback addresses in a mount namespace of this command
# (a hosts file bind-mounted over /etc/hosts; the machine's own is untouched), and MPI's TCP
# traffic between the hosts goes over the loopback interface. Root only (namespaces): exit 77
# otherwise. Used by tests/test_two_hosts.py and bench/placement.sh.
#   bench/two_hosts.sh [--slots A,B] -- MPIRUN_ARGS...     (default --slots 2,2)
set -euo pipefail
slots_a=2 slots_b=2
if [[ ${1:-} == --slots ]]; then
  IFS=, read -r slots_a slots_b <<< "${2:?--slots A,B}"
  shift 2
fi
[[ ${1:-} == -- ]] && shift
if [[ $(id -u) != 0 ]]; then
  echo "two_hosts.sh: needs root (it makes UTS and mount namespaces)" >&2
  exit 77
fi
here=$(cd "$(dirname "$0")" && pwd)
mpirun=${MPIRUN:-$(command -v mpirun)}
"$mpirun" --version 2>&1 | grep -q "Open MPI" ||
  { echo "two_hosts.sh: $mpirun is not Open MPI's (its plm_ssh_agent is what this uses)" >&2; exit 77; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
{ cat /etc/hosts; echo "127.0.0.2 nodeA"; echo "127.0.0.3 nodeB"; } > "$dir/hosts"
printf 'nodeA slots=%s\nnodeB slots=%s\n' "$slots_a" "$slots_b" > "$dir/hostfile"
unshare -m /bin/sh -c 'mount --bind "$1" /etc/hosts && shift && exec "$@"' sh "$dir/hosts" \
  "$mpirun" --prtemca plm_ssh_agent "$here/two_hosts_agent.sh" --hostfile "$dir/hostfile" \
  --mca btl_tcp_if_include lo "$@"
