#!/bin/sh
# Stand-in remote shell for bench/two_hosts.sh: Open MPI calls it as `AGENT [options] HOST
# COMMAND...` (as it would call ssh); it runs COMMAND on this machine in a new UTS namespace
# whose host name is HOST, so each "host" has its own name and its own daemon.
while [ "${1#-}" != "$1" ]; do shift; done
host=$1
shift
exec unshare -u /bin/sh -c 'hostname "$1" && shift && exec /bin/sh -c "$*"' agent "$host" "$@"
