"""faas-named: render one instance's BIND 9 configuration and run ``named`` in the foreground.

Run as root by supervisord. Each start renders the configuration from the settings,
makes the rndc key once, and then becomes ``named -g -u bind``: ``named`` opens port
53 as root and drops to the ``bind`` user; with ``-g`` it stays in the foreground and
logs to stderr, which supervisord keeps in ``$FAAS_ROOT/logs/dns.log``.

On disk (see docs/dns.md)::

    $FAAS_ROOT/dns/            faas 0755 (the launcher)  dnsagent's: named reads it
      faas.db                  faas 0644                 the zone (dnsagent)
      serial                   faas 0644                 last serial handed out (dnsagent)
      rndc.conf                faas 0600                 rndc's config and key (dnsagent)
    $FAAS_ROOT/named/          root:bind 0750            this module's
      named.conf               root:bind 0640
      rndc.key                 root:bind 0640            made once
      work/                    bind:bind 0750            named's directory: pid, lock, session key

named's own configuration is not in ``dns/``: that directory belongs to the faas user,
who could rename any file in it, and ``named`` reads its configuration as root (a
``pid-file`` or ``include`` path there is a root write or read). The faas user gets only
the client side, ``rndc.conf``, a copy of the key it needs for ``rndc reload``.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import sys
import time

from common.daemon import owner_ids
from common.files import atomic_write
from common.layout import Layout
from common.settings import EX_CONFIG, Settings, SettingsError, load, vpn_server
from dnsagent import zone

# rndc control channel: 127.0.0.1 on this port. 953 is rndc's default; a second
# instance on one host needs its own network namespace (as the tests use) or another
# port passed to prepare().
RNDC_PORT = 953
RNDC_HOST = "127.0.0.1"
KEY_NAME = "faas-rndc"
BIND_USER = "bind"
DNS_PORT = 53
MAX_CACHE = "64m"  # the forwarding cache; BIND's default is 90% of the machine's memory
EX_NOPERM = 77
RESOLV_CONF = "/etc/resolv.conf"  # the host's resolver: egress functions' default upstream
# The faas user's PATH under supervisord may lack the sbin directories.
TOOL_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def find_tool(name: str) -> str | None:
    """Absolute path of a BIND tool: PATH first, then the usual bin and sbin dirs."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *TOOL_DIRS])
    return shutil.which(name, path=path)


# --- rendering -----------------------------------------------------------------------


def _quoted(text: str) -> str:
    # named.conf strings end at '"' and know '\' escapes; a path is never allowed either.
    if any(c in text for c in '"\\;{}') or not text.isprintable():
        raise SettingsError(f"{text!r} cannot be written into named.conf: quotes, "
                            "backslashes, braces, semicolons and control characters are "
                            "not allowed in faasd's paths")
    return f'"{text}"'


def _address(text: str) -> str:
    # Settings check upstreams with ip_address(), which keeps any '%scope' text verbatim.
    if "%" in text:
        raise SettingsError(f"dns_upstreams: {text!r}: scoped addresses are not supported")
    ip = ipaddress.ip_address(text)
    return str(type(ip)(int(ip)))


def _network(text: str) -> str:
    net = ipaddress.IPv6Network(text)
    return f"{ipaddress.IPv6Address(int(net.network_address))}/{net.prefixlen}"


def host_resolvers(resolv_conf: str = RESOLV_CONF) -> list[str]:
    """The ``nameserver`` addresses of the host's resolv.conf (loopback ones included:
    named runs on the host, so systemd-resolved's 127.0.0.53 works); none if unreadable."""
    try:
        with open(resolv_conf, encoding="utf-8", errors="replace") as f:
            lines = f.read(65536).splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and "%" not in words[1]:
            try:
                out.append(str(ipaddress.ip_address(words[1])))
            except ValueError:
                continue
    return out[:3]  # as many as the libc resolver uses


def _recursion(settings: Settings, resolv_conf: str = RESOLV_CONF) -> list[str]:
    """Who may resolve names outside faas., through which upstreams. ``dns_upstreams``
    set: VPN peers and egress functions, through those. Unset: egress functions only
    (network=egress promises public names), through the host's own resolvers; VPN peers
    keep getting REFUSED for them, as before egress existed. No resolver: no recursion."""
    egress = _network(settings.egress_prefix)  # egress functions ask from these addresses
    if settings.dns_upstreams:
        upstreams = [_address(a) for a in settings.dns_upstreams]
        clients = f"{_network(settings.vpn_prefix)}; {egress}"
    else:
        upstreams = host_resolvers(resolv_conf)
        clients = egress
    if not upstreams:
        return ["recursion no;", "allow-recursion { none; };", "allow-query-cache { none; };"]
    return [
        "recursion yes;",
        f"allow-recursion {{ {clients}; }};",
        f"allow-query-cache {{ {clients}; }};",
        "forward only;",
        "forwarders { " + " ".join(f"{a};" for a in upstreams) + " };",
    ]


def render_named_conf(settings: Settings, layout: Layout, rndc_port: int = RNDC_PORT,
                      resolv_conf: str = RESOLV_CONF) -> str:
    """named.conf for this instance: authoritative for faas., listening on the VPN
    server address only, forwarding to the upstreams for VPN clients, no transfers."""
    ns = vpn_server(settings.vpn_prefix).ip
    work = layout.named_work
    options = [
        f"directory {_quoted(work)};",
        f"pid-file {_quoted(os.path.join(work, 'named.pid'))};",
        f"lock-file {_quoted(os.path.join(work, 'named.lock'))};",
        f"session-keyfile {_quoted(os.path.join(work, 'session.key'))};",
        f"managed-keys-directory {_quoted(work)};",
        "listen-on { none; };",
        f"listen-on-v6 port {DNS_PORT} {{ {ns}; }};",
        "// netagent puts the address on the WireGuard interface, maybe after named",
        "// starts: the route socket reports it at once; the timed rescan is a fallback.",
        "automatic-interface-scan yes;",
        "interface-interval 1;",
        "version none;",
        "hostname none;",
        "server-id none;",
        "allow-transfer { none; };",
        "allow-update { none; };",
        "notify no;",
        "// the upstream resolvers validate; validating again here breaks behind one",
        "// that strips DNSSEC records, and would fetch root keys at every start.",
        "dnssec-validation no;",
        f"max-cache-size {MAX_CACHE};",
        *_recursion(settings, resolv_conf),
    ]
    zone_opts = [
        "type primary;",
        f"file {_quoted(layout.zone_file)};",
        "allow-transfer { none; };",
        "allow-update { none; };",
        "notify no;",
    ]
    return "\n".join([
        "// Rendered by faas-named from faasd's settings at every start; edits are lost.",
        "options {", *(f"\t{o}" for o in options), "};",
        "",
        f"include {_quoted(layout.rndc_key)};",
        (f"controls {{ inet {RNDC_HOST} port {int(rndc_port)} allow {{ {RNDC_HOST}; }} "
         f'keys {{ "{KEY_NAME}"; }}; }};'),
        "",
        f'zone "{zone.ORIGIN.rstrip(".")}" {{', *(f"\t{o}" for o in zone_opts), "};",
        "",
    ])


def new_secret() -> str:
    """A fresh HMAC-SHA256 key: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(32)).decode()


def render_key(secret: str) -> str:
    """The key statement, shared by named.conf (include) and rndc.conf."""
    return f'key "{KEY_NAME}" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n'


def render_rndc_conf(secret: str, rndc_port: int = RNDC_PORT) -> str:
    """rndc's client config: the key inline (the faas user cannot read named's copy)."""
    return (render_key(secret)
            + f'options {{\n\tdefault-key "{KEY_NAME}";\n\tdefault-server {RNDC_HOST};\n'
            f"\tdefault-port {int(rndc_port)};\n}};\n")


_SECRET = re.compile(r'secret "([A-Za-z0-9+/]{43}=)";')


def read_secret(path: str) -> str | None:
    """The secret of a key file this module wrote, or None (missing or not ours)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            m = _SECRET.search(f.read())
    except FileNotFoundError:
        return None
    return m.group(1) if m else None


# --- preparing an instance (root) -----------------------------------------------------


def _directory(path: str, uid: int, gid: int, mode: int) -> None:
    os.makedirs(path, exist_ok=True)
    if os.path.islink(path):
        raise SettingsError(f"{path} is a symlink; faas-named wants a real directory there")
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def prepare(settings: Settings, rndc_port: int = RNDC_PORT, bind_user: str = BIND_USER) -> Layout:
    """Create named's directories, the key (once), named.conf and rndc.conf. Root only.

    Idempotent: run at every start, so a changed setting takes effect on restart and a
    damaged or missing file is rewritten.
    """
    layout = Layout(settings.root, settings.run)
    try:
        bind = pwd.getpwnam(bind_user)
    except KeyError:
        raise SettingsError(f"no user {bind_user}: install the bind9 package") from None
    uid, gid = owner_ids(settings)
    conf = render_named_conf(settings, layout, rndc_port).encode()
    _directory(layout.dns_dir, uid, gid, 0o755)  # as the launcher makes it
    _directory(layout.named_dir, 0, bind.pw_gid, 0o750)
    _directory(layout.named_work, bind.pw_uid, bind.pw_gid, 0o750)
    secret = read_secret(layout.rndc_key)
    if secret is None:
        secret = new_secret()
        atomic_write(layout.rndc_key, render_key(secret).encode(), 0o640, (0, bind.pw_gid))
    os.chown(layout.rndc_key, 0, bind.pw_gid)
    os.chmod(layout.rndc_key, 0o640)
    atomic_write(layout.named_conf, conf, 0o640, (0, bind.pw_gid))
    # Into the faas user's directory: stage() opens a fresh O_EXCL name and commit()
    # renames over whatever sits at rndc.conf, so a planted symlink is never followed.
    atomic_write(layout.rndc_conf, render_rndc_conf(secret, rndc_port).encode(), 0o600,
                 (uid, gid))
    return layout


def named_argv(layout: Layout, bind_user: str = BIND_USER) -> list[str]:
    """The command that runs named for this instance in the foreground."""
    named = find_tool("named")
    if named is None:
        raise SettingsError("named not found: install the bind9 package")
    return [named, "-g", "-u", bind_user, "-c", layout.named_conf]


def stop_stale(layout: Layout, grace: float = 5.0) -> None:
    """A named of this instance still running (its supervisord was killed, and named,
    having changed its uid, did not get the parent-death signal) holds port 53 and its
    lock: stopped, so this one can start. Only a process whose command line names this
    instance's named.conf is touched."""
    try:
        with open(os.path.join(layout.named_work, "named.pid"), encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return
    if pid <= 1 or layout.named_conf.encode() not in argv:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(f"/proc/{pid}"):
        os.kill(pid, signal.SIGKILL)
    print(f"faas-named: stopped a named left running (pid {pid})", file=sys.stderr)


def main() -> None:
    """Console script faas-named: render this instance's configuration, exec named."""
    try:
        settings = load()
        if os.geteuid() != 0:
            print("faas-named: run me as root (named opens port 53, then becomes bind)",
                  file=sys.stderr)
            sys.exit(EX_NOPERM)
        layout = prepare(settings)
        stop_stale(layout)
        argv = named_argv(layout)
    except SettingsError as exc:
        print(f"faas-named: {exc}", file=sys.stderr)
        sys.exit(EX_CONFIG)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
