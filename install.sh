#!/usr/bin/env bash
# Install faasd on Debian 12 from this checkout and start it. Run as root.
#
#   ./install.sh              install everything and start the platform
#   ./install.sh --no-start   install everything (and the test tools) but start nothing
#
# Idempotent: run it again after pulling a new version.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
prefix=${FAAS_PREFIX:-/opt/faasd}
start=1
for arg in "$@"; do
  case "$arg" in
    --no-start) start=0 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run me as root (sudo $0)" >&2; exit 1; }

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

# Everything the platform and its tests run: the OCI runtimes, WireGuard (kernel module
# where present, wireguard-go otherwise), iproute2 and ip6tables, BIND 9 and its tools,
# curl, zstd for image layers, a C compiler for the test handlers, e2fsprogs and
# util-linux's mount for volumes.
packages=(python3 python3-venv runc crun wireguard-tools wireguard-go iproute2 iptables
          bind9 bind9-utils bind9-dnsutils curl zstd gcc libc6-dev util-linux procps
          iputils-ping e2fsprogs mount)
# The test tools beyond those, for --no-start only (./test.sh): the stock Debian 12 guest
# of tests/guest/ is built with debootstrap and booted under QEMU (docs/guest.md).
[ "$start" -eq 1 ] || packages+=(qemu-system-x86 qemu-utils debootstrap)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! getent group faas >/dev/null; then
  say "creating group faas (operators in it may use faasctl)"
  groupadd --system faas
fi
if ! getent passwd faas >/dev/null; then
  say "creating user faas (runs the controller and dnsagent)"
  useradd --system --gid faas --home-dir /nonexistent --no-create-home \
          --shell /usr/sbin/nologin faas
fi

say "installing the faasd package into $prefix/venv"
[ -x "$prefix/venv/bin/python" ] || /usr/bin/python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install -q --disable-pip-version-check "$here[test]"
chmod -R a+rX "$prefix"

# faasd runs its own named under supervisord (faas-named): the distribution's instance
# would hold rndc's port 953 and answer on every address, so it is stopped for good.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now named.service >/dev/null 2>&1 || true
fi
# Debian confines named with AppArmor; let it read faasd's zone and configuration and
# write its working directory (pid, lock, session key) under the default FAAS_ROOT. The
# lock needs `k` (a Debian 12 guest showed named restarting on "file_lock" denials), so
# lines an older install.sh wrote without it are replaced.
aa_local=/etc/apparmor.d/local/usr.sbin.named
if [ -d /etc/apparmor.d/local ] \
   && ! grep -qF '/var/lib/faasd/named/work/** rwk,' "$aa_local" 2>/dev/null; then
  [ ! -e "$aa_local" ] || sed -i '/^# faasd (install.sh)/d; \#^/var/lib/faasd/#d' "$aa_local"
  cat >>"$aa_local" <<'AA'
# faasd (install.sh): its zone, its named.conf and named's working directory
/var/lib/faasd/dns/ r,
/var/lib/faasd/dns/** r,
/var/lib/faasd/named/ r,
/var/lib/faasd/named/** r,
/var/lib/faasd/named/work/ rw,
/var/lib/faasd/named/work/** rwk,
AA
  if command -v apparmor_parser >/dev/null && [ -e /etc/apparmor.d/usr.sbin.named ] \
     && [ -d /sys/kernel/security/apparmor ]; then
    apparmor_parser -r /etc/apparmor.d/usr.sbin.named || true
  fi
fi

install -d -m 0755 /etc/faasd
[ -e /etc/faasd/faasd.toml ] || install -m 0644 "$here/etc/faasd.toml" /etc/faasd/faasd.toml
install -m 0644 "$here/supervisord.conf" /etc/faasd/supervisord.conf
for tool in faasctl faasd; do ln -sf "$prefix/venv/bin/$tool" "/usr/local/bin/$tool"; done

[ "$start" -eq 1 ] || exit 0

# Where systemd is PID 1, faasd.service runs supervisord in the foreground and starts the
# platform at boot (docs/operations.md, "Start at boot"). Written on every run, so an
# upgrade gets the current unit; enabled, not started, here.
systemd=0
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemd=1
  cat >/etc/systemd/system/faasd.service.new <<UNIT
# Written by faasd's install.sh: edit the checkout's install.sh, not this file.
[Unit]
Description=faasd, a Function-as-a-Service host (supervisord and its programs)
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=$prefix/venv/bin/faasd up --foreground
# The same ordered stop as faasd down: supervisord stops each program (the runner its
# containers, which live in /faasd/<id> cgroups outside this unit's), then the
# interface and firewall chains go. Whatever is left in this unit's cgroup after that
# gets SIGKILL.
ExecStop=$prefix/venv/bin/faasd down
KillMode=mixed
TimeoutStopSec=120
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
UNIT
  mv /etc/systemd/system/faasd.service.new /etc/systemd/system/faasd.service
  systemctl daemon-reload
  systemctl enable faasd.service >/dev/null 2>&1
fi

if faasd ctl pid >/dev/null 2>&1; then
  # An upgrade: one program at a time, the keeper holding the listeners and waiting
  # connections while the runner restarts, so no request is lost (docs/operations.md).
  say "faasd is running: restarting it on the new code, one program at a time"
  faasd reload
elif [ "$systemd" -eq 1 ]; then
  say "starting faasd through systemd (faasd.service, enabled: it starts at boot)"
  systemctl start faasd.service
else
  say "starting faasd (systemd is not PID 1 here: faasd will NOT start at boot)"
  echo "    to start it at boot, have your init run \`faasd up\` (cron: a line" \
       "'@reboot root /usr/local/bin/faasd up' in /etc/crontab); docs/operations.md"
  faasd up
fi
for _ in $(seq 150); do
  faasctl status >/dev/null 2>&1 && break
  sleep 0.2
done
faasctl status

# The example function, so there is something to call at once (only the first time:
# every `new` would be a new version).
if ! faasctl info fibonacci >/dev/null 2>&1; then
  say "deploying the example function fibonacci"
  example=$(mktemp -d)
  trap 'rm -rf "$example"' EXIT
  /usr/bin/python3 "$here/examples/build.py" fibonacci "$example/fibonacci.tar"
  faasctl new fibonacci -f "$example/fibonacci.tar"
fi
address=$(faasctl ip fibonacci)
for _ in $(seq 100); do
  curl -sf -m 5 "http://[$address]/?n=10" >/dev/null && break
  sleep 0.1
done
say "fibonacci.faas answers at [$address]:80:"
curl -sS -m 10 "http://[$address]/?n=10"
cat <<'EOF'

Next, to reach it by name from a laptop: set vpn_endpoint = "HOST:51820" (this host's
public name and wg_port) in /etc/faasd/faasd.toml, `faasd ctl restart controller`, then
`faasctl vpn add laptop > laptop.conf`; on the laptop `faasctl vpn connect laptop.conf`
(or wg-quick) and `curl 'http://fibonacci.faas/?n=10'`.
EOF
