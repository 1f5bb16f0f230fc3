"""Whether `-C` can reach the postgres the spec configures (pure): its port against the spec's
`port`, its host against `listen_addresses` (postgres' defaults when the spec sets neither:
5432, `localhost`). Checked before PGDATA is made, so a spec that moves postgres away from `-C`
fails with both values named instead of `Connection refused` once postgres is up.

Only what can be decided without resolving names: a host that is a DNS name other than
`localhost` is checked only against a `listen_addresses` that listens on no TCP address at all.
A Unix-socket `-C` (host a directory) is checked for its port only (the socket's name has it).
"""

from __future__ import annotations

import ipaddress

from compute.model.conninfo import ConninfoError, parse as conninfo_to_dict
from compute.model.spec import ComputeSpec, postgresql_conf_settings

DEFAULT_PORT = "5432"
DEFAULT_LISTEN = "localhost"


def _setting(spec: ComputeSpec, name: str) -> tuple[str | None, bool]:
    """(value, given) of a setting, matched as postgres does (names ignore case; the last wins),
    in postgresql.conf's order: `cluster.postgresql_conf` first (HEAD's launch sets the port
    there, with `cluster.settings` null), then `cluster.settings`."""
    found: tuple[str | None, bool] = (None, False)
    for conf_name, value in postgresql_conf_settings(spec.postgresql_conf):
        if conf_name.lower() == name:
            found = (value, True)
    for opt in spec.cluster.settings:
        if opt.name.lower() == name:
            found = (opt.value, True)
    return found


def _first(value: str | None) -> str | None:
    """libpq's lists (`host=a,b port=1,2`): the first entry."""
    return value.split(",")[0].strip() if value else value


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def listens_on(host: str, listen: str) -> bool | None:
    """Whether postgres with this `listen_addresses` accepts TCP connections to `host`; None
    when that cannot be known without resolving `host`."""
    entries = [e.strip() for e in listen.split(",") if e.strip()]
    if not entries:
        return False  # no TCP at all
    if "*" in entries:
        return True
    ip = _ip(host)
    wanted = {host.lower()} if ip is None else {str(ip), host.lower()}
    if any(e.lower() in wanted for e in entries):
        return True
    if ip is None and host.lower() != "localhost":
        return None  # a name: which address it has is not ours to know here
    if ip is None:  # localhost: its addresses
        return any(e in ("127.0.0.1", "::1", "0.0.0.0", "::") for e in entries)
    if ip.is_loopback and "localhost" in (e.lower() for e in entries):
        return True
    return ("0.0.0.0" if ip.version == 4 else "::") in entries


def connstr_mismatch(connstr: str, spec: ComputeSpec) -> str | None:
    """A sentence naming both sides when `-C` cannot reach the postgres `spec` configures;
    None when it can (or when that cannot be known)."""
    try:
        params = conninfo_to_dict(connstr)
    except ConninfoError:
        return None  # the connstr itself is checked elsewhere
    c_port = _first(params.get("port")) or DEFAULT_PORT
    s_port, port_given = _setting(spec, "port")
    s_port = s_port if port_given and s_port else DEFAULT_PORT
    try:
        ports_differ = int(c_port) != int(s_port, 0)
    except ValueError:
        ports_differ = False  # not numbers: postgres or libpq says so itself
    if ports_differ:
        where = "the spec's \"port\" setting is" if port_given else "the spec sets no \"port\", so postgres uses"
        return (f"-C connects to port {c_port}, but {where} {s_port}: set \"port\" to {c_port} in "
                "cluster.settings, or give -C postgres' port")
    host = _first(params.get("hostaddr")) or _first(params.get("host"))
    if not host or host.startswith("/") or host.startswith("@"):
        return None  # a Unix socket: the port above is what names it
    listen, listen_given = _setting(spec, "listen_addresses")
    listen = listen if listen_given and listen is not None else DEFAULT_LISTEN
    if listens_on(host, listen) is False:
        where = ("the spec's \"listen_addresses\" is" if listen_given
                 else "the spec sets no \"listen_addresses\", so postgres uses")
        return (f"-C connects to host {host}, but {where} {listen!r}, which does not include it: add it "
                "(or '*') to \"listen_addresses\" in cluster.settings, or give -C an address postgres listens on")
    return None
