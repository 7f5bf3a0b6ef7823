#!/usr/bin/env bash
# Simulated cluster hosts on this machine: N network namespaces NAME-h0 ..
# NAME-h(N-1), each with one link (a veth pair) into a bridge, its own
# address 10.SUBNET.0.(i+1)/24 and nothing else (no route to the machine's
# other networks), and its outgoing traffic limited to RATE by a token
# bucket (tc tbf), so that every packet between two hosts crosses two
# rate-limited links, as on a switched cluster network. The kernel here has
# tbf but not netem: rates can be set, added delay cannot. Each host also has
# a /dev/shm of its own (a folder under /tmp bound over it), so processes on
# different hosts cannot pass bytes through shared memory, as on real hosts.
#
#   hosts.sh up NAME N SUBNET RATE     (RATE as tc takes it: 10gbit, 1gbit)
#   hosts.sh down NAME N
#   hosts.sh exec NAME I CMD ARGS...   (runs CMD on host I)
#   hosts.sh rsh NAME-hI CMD...        (the same, as mpirun's remote shell:
#                                       --mca plm_rsh_agent "bash hosts.sh rsh")
#
# Needs root (ip netns). Names must be short: interfaces are NAME-b, NAME-vI.
set -euo pipefail

up() {
    local name=$1 n=$2 subnet=$3 rate=$4
    ip link add "$name-b" type bridge
    ip link set "$name-b" up
    for ((i = 0; i < n; i++)); do
        local host="$name-h$i"
        ip netns add "$host"
        mkdir -p "/tmp/$host-shm"
        ip link add "$name-v$i" type veth peer name eth0 netns "$host"
        ip link set "$name-v$i" master "$name-b" up
        ip -n "$host" link set lo up
        ip -n "$host" addr add "10.$subnet.0.$((i + 1))/24" dev eth0
        ip -n "$host" link set eth0 up
        # burst: at least rate / HZ, or tbf cannot reach the rate.
        ip netns exec "$host" tc qdisc add dev eth0 root tbf rate "$rate" burst 4mb latency 50ms
    done
}

down() {
    local name=$1 n=$2
    for ((i = 0; i < n; i++)); do
        ip netns del "$name-h$i" 2>/dev/null || true
        rm -rf "/tmp/$name-h$i-mpi" "/tmp/$name-h$i-shm"
    done
    ip link del "$name-b" 2>/dev/null || true
}

case "${1:-}" in
    up) up "$2" "$3" "$4" "$5" ;;
    down) down "$2" "$3" ;;
    exec)
        host="$2-h$3"
        shift 3
        # `ip netns exec` gives the command a mount namespace of its own, so
        # the bind stays inside it.
        exec ip netns exec "$host" sh -c 'mount --bind "$0" /dev/shm && exec "$@"' "/tmp/$host-shm" "$@"
        ;;
    rsh)
        # mpirun passes its remote command as words of one shell line. The
        # hosts share this machine's /tmp and host name, so each gets its
        # own TMPDIR: Open MPI's session folders would otherwise collide.
        host="$2"
        shift 2
        mkdir -p "/tmp/$host-mpi"
        exec ip netns exec "$host" env TMPDIR="/tmp/$host-mpi" sh -c "mount --bind /tmp/$host-shm /dev/shm && $*"
        ;;
    *)
        echo "usage: $0 up NAME N SUBNET RATE | down NAME N | exec NAME I CMD..." >&2
        exit 2
        ;;
esac
