#!/usr/bin/env bash
# Start the image that scripts/build_image.sh built, without a container runtime (podman and
# runc cannot set rlimits on these machines): its filesystem from `buildah from` + `buildah
# mount`, entered with chroot as the image's User, with its Env and WorkingDir, running its
# Entrypoint and Cmd as PID 1 of a PID namespace of its own, in a network namespace of its own
# where it listens on port 3000; socat publishes that port on the host, as `docker run -p
# PORT:3000` does (docs/deploy.md, "Build and run the image without Docker").
#
#   bash scripts/run_image.sh start [-e KEY=VALUE]... [-- ARG...]  # prints the URL
#   bash scripts/run_image.sh healthcheck   # the image's HEALTHCHECK, run inside (docker exec)
#   bash scripts/run_image.sh exec CMD...   # a command inside, as the image's user
#   bash scripts/run_image.sh status | logs
#   bash scripts/run_image.sh stop          # SIGTERM to PID 1, SIGKILL after STOP_TIMEOUT s;
#                                           # prints the exit status and removes the container
#
# Settings (environment): IMAGE=localhost/bentosvd:demo  NAME=bentosvd-demo (one container
# per name)  PORT=3000 (on the host)  HOST_IP=127.0.0.1  STOP_TIMEOUT=30  SHM_SIZE=64m
# IMAGE_WORK=/var/tmp/bentosvd-image (state under run/NAME, the server's log at run/NAME.log).
# Needs root (mounts, namespaces), buildah, socat and iproute2 (build_image.sh installs them).
set -euo pipefail

IMAGE=${IMAGE:-localhost/bentosvd:demo}
NAME=${NAME:-bentosvd-demo}
PORT=${PORT:-3000}
HOST_IP=${HOST_IP:-127.0.0.1}
STOP_TIMEOUT=${STOP_TIMEOUT:-30}
SHM_SIZE=${SHM_SIZE:-64m}
WORK=${IMAGE_WORK:-/var/tmp/bentosvd-image}
STATE=$WORK/run/$NAME
LOG=$WORK/run/$NAME.log
say() { echo "run_image: $*"; }
die() { echo "run_image: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || {
  command -v sudo >/dev/null && sudo -n true 2>/dev/null && exec sudo -n -E bash "$0" "$@"
  die "needs root (mounts and namespaces), or sudo without a password"
}
for tool in buildah socat ip nsenter unshare python3; do
  command -v "$tool" >/dev/null || die "no $tool: run scripts/build_image.sh first (it installs what is missing)"
done

alive() { [ -f "$STATE/pid1" ] && kill -0 "$(cat "$STATE/pid1")" 2>/dev/null; }
state() { cat "$STATE/$1"; }

# The image's config, as `docker run` reads it: Env (one per line), WorkingDir, User, the
# command (Entrypoint + Cmd, one per line), the HEALTHCHECK (Docker's Healthcheck.Test).
image_config() {
  buildah inspect --type image "$IMAGE" | python3 -c '
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
config = json.load(sys.stdin)["Docker"]["config"]
(out / "env").write_text("".join(e + "\n" for e in config.get("Env") or []))
(out / "workdir").write_text(config.get("WorkingDir") or "/")
(out / "user").write_text(config.get("User") or "root")
(out / "command").write_text("".join(a + "\n" for a in (config.get("Entrypoint") or []) + (config.get("Cmd") or [])))
check = config.get("Healthcheck") or {}
(out / "healthcheck").write_text("".join(a + "\n" for a in check.get("Test") or []))
(out / "healthcheck_timeout").write_text(str((check.get("Timeout") or 30 * 10**9) // 10**9))
' "$STATE"
}

# uid and gid of the image's user (name or number, as USER allows), from its /etc/passwd.
resolve_user() {
  local spec=$1 root=$2 user group uid gid
  user=${spec%%:*}; group=""; [[ $spec == *:* ]] && group=${spec#*:}
  if [[ $user =~ ^[0-9]+$ ]]; then uid=$user; gid=$(awk -F: -v u="$user" '$3==u {print $4; exit}' "$root/etc/passwd")
  else read -r uid gid < <(awk -F: -v u="$user" '$1==u {print $3, $4; exit}' "$root/etc/passwd"); fi
  [ -n "${uid:-}" ] || die "user $user is not in the image's /etc/passwd"
  if [ -n "$group" ]; then
    [[ $group =~ ^[0-9]+$ ]] && gid=$group || gid=$(awk -F: -v g="$group" '$1==g {print $3; exit}' "$root/etc/group")
  fi
  home=$(awk -F: -v u="$uid" '$3==u {print $6; exit}' "$root/etc/passwd")
  echo "$uid ${gid:-0} ${home:-/}"
}

cleanup() {  # the socat, the container (mount and all), the network namespace, the state
  [ -f "$STATE/socat_pid" ] && kill "$(state socat_pid)" 2>/dev/null || true
  if [ -f "$STATE/netns" ]; then ip netns delete "$(state netns)" 2>/dev/null || true; fi
  if buildah inspect --type container "$NAME" >/dev/null 2>&1; then
    buildah umount "$NAME" >/dev/null 2>&1 || true
    buildah rm "$NAME" >/dev/null 2>&1 || true
  fi
  rm -rf "$STATE"
}

start() {
  local extra_env=()
  while [ $# -gt 0 ]; do
    case $1 in
      -e) extra_env+=("$2"); shift 2 ;;
      --) shift; break ;;
      *) die "start: unknown option $1 (start [-e KEY=VALUE]... [-- ARG...])" ;;
    esac
  done
  if alive; then die "$NAME is already running (pid $(state pid1)); stop it first"; fi
  cleanup  # what a container of this name left behind (a killed script, a crash)
  buildah inspect --type image "$IMAGE" >/dev/null 2>&1 || die "no image $IMAGE: run scripts/build_image.sh"
  if (exec 3<>"/dev/tcp/$HOST_IP/$PORT") 2>/dev/null; then die "port $PORT is taken on $HOST_IP"; fi
  mkdir -p "$STATE"
  trap 'cleanup' ERR

  image_config
  buildah from --quiet --name "$NAME" "$IMAGE" >/dev/null
  local root; root=$(buildah mount "$NAME")
  echo "$root" >"$STATE/root"
  read -r uid gid home < <(resolve_user "$(state user)" "$root")

  # Network: a namespace with a veth pair to the host, 10.231.N.2/30 inside.
  local n ns host_if
  for n in $(seq 1 250); do
    ip -4 -o addr show | grep -q " 10\.231\.$n\.1/" || break
  done
  ns=$NAME; host_if=bsvd${n}h
  ip netns add "$ns"; echo "$ns" >"$STATE/netns"
  ip link add "$host_if" type veth peer name eth0 netns "$ns"
  ip addr add "10.231.$n.1/30" dev "$host_if"; ip link set "$host_if" up
  ip -n "$ns" addr add "10.231.$n.2/30" dev eth0
  ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "10.231.$n.1"
  local address=10.231.$n.2
  printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n%s\t%s\n' "$address" "$NAME" >"$STATE/hosts"
  echo "$NAME" >"$STATE/hostname"
  cp /etc/resolv.conf "$STATE/resolv.conf"

  # The environment docker run gives: the image's Env, HOSTNAME, HOME (the user's), then -e.
  { echo "HOSTNAME=$NAME"; echo "HOME=$home"; cat "$STATE/env"; printf '%s\n' "${extra_env[@]}"; } \
    | grep -v '^$' >"$STATE/run_env"
  mapfile -t command <"$STATE/command"
  command+=("$@")
  echo "$uid:$gid" >"$STATE/ids"

  # PID 1 of the container (own mount, PID, UTS and IPC namespaces): mounts /sys, /dev, /dev/shm and the /etc files in its own mount
  # namespace (all gone when it ends), then becomes the image's command under chroot.
  cat >"$STATE/init.sh" <<'EOF'
set -eu
root=$1 state=$2 shm=$3; shift 3
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys"
mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs "$root/dev"
for node in null zero full random urandom tty; do
  touch "$root/dev/$node"; mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir -p "$root/dev/shm" "$root/dev/pts"
mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size="$shm" shm "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"; ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"; ln -s /proc/self/fd/2 "$root/dev/stderr"
cat "$state/hostname" >/proc/sys/kernel/hostname  # its own UTS namespace
for file in hosts hostname resolv.conf; do
  [ -e "$root/etc/$file" ] || touch "$root/etc/$file"
  mount --bind -o ro "$state/$file" "$root/etc/$file"
done
ids=$(cat "$state/ids") workdir=$(cat "$state/workdir")
mapfile -t envs <"$state/run_env"
exec chroot --userspec="$ids" --groups="${ids#*:}" "$root" \
  /usr/bin/env -i -C "$workdir" "${envs[@]}" "$@"
EOF
  mkdir -p "$(dirname "$LOG")"
  : >"$LOG"
  # unshare forks PID 1 and waits for it; --kill-child: if unshare dies, PID 1 (and with it
  # every process of the namespace) gets SIGKILL. The exit status goes to the state folder.
  setsid bash -c '
    ip netns exec "$1" unshare --mount --pid --uts --ipc --fork --kill-child --mount-proc="$2/proc" \
      bash "$3/init.sh" "$2" "$3" "$4" "${@:5}" &
    echo $! >"$3/unshare_pid"
    wait $!; echo $? >"$3/exit_status"' \
    run_image "$ns" "$root" "$STATE" "$SHM_SIZE" "${command[@]}" >>"$LOG" 2>&1 </dev/null &
  local pid1="" i
  for i in $(seq 1 100); do
    if [ -f "$STATE/unshare_pid" ]; then
      pid1=$(cat "/proc/$(state unshare_pid)/task/$(state unshare_pid)/children" 2>/dev/null | awk '{print $1}')
      [ -n "$pid1" ] && break
    fi
    [ -f "$STATE/exit_status" ] && break
    sleep 0.1
  done
  [ -n "$pid1" ] || { tail -n 20 "$LOG" >&2; die "the container did not start (log above)"; }
  echo "$pid1" >"$STATE/pid1"

  setsid socat "TCP-LISTEN:$PORT,bind=$HOST_IP,reuseaddr,fork" "TCP:$address:3000" </dev/null >>"$LOG.socat" 2>&1 &
  echo $! >"$STATE/socat_pid"
  trap - ERR
  say "started $IMAGE as $NAME (pid $pid1; $address:3000 in its network namespace)"
  say "log: $LOG"
  say "stop: bash scripts/run_image.sh stop${NAME:+ (NAME=$NAME)}"
  echo "http://$HOST_IP:$PORT" | tee "$STATE/url"
}

# A process inside the running container, as `docker exec` makes it: its namespaces, root,
# working folder, user and environment.
in_container() {
  alive || die "$NAME is not running"
  local ids; ids=$(state ids)
  mapfile -t envs <"$STATE/run_env"
  nsenter --target "$(state pid1)" --mount --net --pid --uts --ipc --root --wd \
    --setuid "${ids%%:*}" --setgid "${ids#*:}" -- /usr/bin/env -i "${envs[@]}" "$@"
}

healthcheck() {
  alive || die "$NAME is not running"
  mapfile -t test <"$STATE/healthcheck"
  local timeout; timeout=$(state healthcheck_timeout)
  case ${test[0]:-NONE} in
    CMD-SHELL) say "healthcheck (inside, timeout ${timeout}s): /bin/sh -c '${test[1]}'"
               in_container timeout "$timeout" /bin/sh -c "${test[1]}" ;;
    CMD) say "healthcheck (inside, timeout ${timeout}s): ${test[*]:1}"
         in_container timeout "$timeout" "${test[@]:1}" ;;
    *) die "the image has no HEALTHCHECK" ;;
  esac
}

stop() {
  if ! [ -f "$STATE/pid1" ]; then say "$NAME is not running"; cleanup; return 0; fi
  local pid1 waited=0 status
  pid1=$(state pid1)
  if kill -TERM "$pid1" 2>/dev/null; then
    while [ ! -f "$STATE/exit_status" ] && [ "$waited" -lt $((STOP_TIMEOUT * 10)) ]; do
      sleep 0.1; waited=$((waited + 1))
    done
    if [ ! -f "$STATE/exit_status" ]; then
      say "still running after ${STOP_TIMEOUT}s: SIGKILL"
      kill -KILL "$pid1" 2>/dev/null || true
      while [ ! -f "$STATE/exit_status" ]; do sleep 0.1; done
    fi
  fi
  for _ in $(seq 1 50); do [ -f "$STATE/exit_status" ] && break; sleep 0.1; done
  status=$(cat "$STATE/exit_status" 2>/dev/null || echo unknown)
  cleanup
  say "stopped $NAME after $((waited / 10)).$((waited % 10)) s: exit status $status"
  [ "$status" = 0 ]
}

case ${1:-} in
  start) shift; start "$@" ;;
  stop) stop ;;
  healthcheck) healthcheck ;;
  exec) shift; in_container "$@" ;;
  status) if alive; then say "$NAME running (pid $(state pid1)), $(state url)"; else say "$NAME not running"; exit 1; fi ;;
  logs) cat "$LOG" ;;
  *) sed -n '2,21p' "$0"; exit 2 ;;
esac
