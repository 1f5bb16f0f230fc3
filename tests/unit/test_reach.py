"""-C against the spec's port and listen_addresses (compute/model/reach.py)."""

import pytest

from compute.model.reach import connstr_mismatch, listens_on
from compute.model.spec import parse_spec


def spec(**settings):
    return parse_spec({"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": [
        {"name": k, "value": v, "vartype": "string"} for k, v in settings.items()]}})


def test_matching_port_and_address_pass():
    assert connstr_mismatch("postgresql://cloud_admin@127.0.0.1:55432/postgres",
                            spec(port="55432", listen_addresses="127.0.0.1")) is None
    assert connstr_mismatch("host=127.0.0.1 port=5432 user=a", spec()) is None  # both defaults
    assert connstr_mismatch("host=localhost port=6000 user=a", spec(PORT="6000")) is None  # names ignore case


def test_a_missing_port_setting_is_named():
    msg = connstr_mismatch("postgresql://cloud_admin@127.0.0.1:55432/postgres", spec(listen_addresses="*"))
    assert msg and "port 55432" in msg and "sets no \"port\"" in msg and "5432" in msg


def test_a_different_port_names_both():
    msg = connstr_mismatch("postgresql://a@127.0.0.1:55432/postgres", spec(port="55433"))
    assert "55432" in msg and "55433" in msg


def test_listen_addresses_must_include_the_host():
    msg = connstr_mismatch("postgresql://a@10.1.2.3:5432/postgres", spec(listen_addresses="127.0.0.1"))
    assert msg and "10.1.2.3" in msg and "'127.0.0.1'" in msg
    msg = connstr_mismatch("postgresql://a@10.1.2.3:5432/postgres", spec())  # default localhost
    assert msg and "sets no \"listen_addresses\"" in msg
    assert connstr_mismatch("postgresql://a@127.0.0.1:5432/postgres", spec(listen_addresses="")) is not None


def test_a_unix_socket_or_a_dns_name_is_checked_for_what_can_be_known():
    assert connstr_mismatch("host=/tmp port=5432 user=a", spec(listen_addresses="")) is None
    assert connstr_mismatch("host=/tmp port=5433 user=a", spec()) is not None
    assert connstr_mismatch("host=db.internal port=5432 user=a", spec(listen_addresses="10.0.0.1")) is None


@pytest.mark.parametrize("host,listen,ok", [
    ("127.0.0.1", "localhost", True), ("::1", "localhost", True), ("localhost", "127.0.0.1", True),
    ("127.0.0.1", "0.0.0.0", True), ("127.0.0.1", "::", False), ("::1", "::", True),
    ("10.0.0.5", "*", True), ("10.0.0.5", "10.0.0.5, 127.0.0.1", True), ("10.0.0.5", "localhost", False),
    ("127.0.0.1", "", False), ("example.com", "localhost", None), ("example.com", "example.com", True),
])
def test_listens_on(host, listen, ok):
    assert listens_on(host, listen) is ok


def test_heads_launch_sets_the_port_in_postgresql_conf():
    """endpoint.rs sends `settings: null` and the port in `cluster.postgresql_conf`, which is
    written first: it counts, and cluster.settings (written after it) win."""
    def conf_spec(text, **settings):
        doc = {"format_version": 1.0, "cluster": {"roles": [], "databases": [], "settings": [
            {"name": k, "value": v, "vartype": "string"} for k, v in settings.items()] or None,
            "postgresql_conf": text}}
        return parse_spec(doc)
    text = "max_wal_senders='10'\nlisten_addresses='127.0.0.1'\nport = '55432'  # endpoint.rs\n\n"
    assert connstr_mismatch("postgresql://cloud_admin@127.0.0.1:55432/postgres", conf_spec(text)) is None
    assert "55433" in connstr_mismatch("postgresql://a@127.0.0.1:55432/postgres", conf_spec(text, port="55433"))
    assert "10.1.2.3" in connstr_mismatch("postgresql://a@10.1.2.3:55432/postgres", conf_spec(text))
    assert connstr_mismatch("postgresql://a@127.0.0.1:6000/postgres", conf_spec("port 6000\nport=7000\n")) is not None
    assert connstr_mismatch("postgresql://a@127.0.0.1:7000/postgres", conf_spec("port 6000\nport=7000\n")) is None
