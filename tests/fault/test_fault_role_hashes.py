"""Issue 19, item 4: spec roles read every role's password verifier (pg_read_all_data reads
pg_authid in PG15), on a booted tree. What follows from it (docs/security.md, "Role passwords"):

- an md5 hash logs in as its role: postgres' md5 challenge is answered with the stored hash
  alone. Documented residual risk (the contract lets a spec carry md5 hashes): the compute says
  so in its log once per md5 verifier it writes;
- a SCRAM-SHA-256 verifier does not: `host ... md5` in pg_hba.conf never offers md5 to a role
  whose verifier is SCRAM (PG >= 10 runs SCRAM instead), and the verifier (StoredKey, ServerKey)
  is not the password, nor enough to compute a client proof.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import psycopg
import pytest

from tests.peers.control_plane import ControlPlanePeer
from tests.peers.md5_replay import AUTH_MD5, AUTH_SASL, login_with_hash
from tests.support.tree import SUPERUSER, Compute
from tests.support.waiting import wait_for

PASSWORDS = {"attacker": "attacker-pw-1", "victim_md5": "victim-md5-pw", "victim_scram": "victim-scram-pw"}


def md5_hash(password: str, role: str) -> str:
    return hashlib.md5((password + role).encode()).hexdigest()


def scram_verifier(password: str, salt: bytes = b"0123456789abcdef", iterations: int = 4096) -> str:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", "sha256").digest()).digest()
    server = hmac.new(salted, b"Server Key", "sha256").digest()
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored)}:{b64(server)}"


VERIFIERS = {"attacker": scram_verifier(PASSWORDS["attacker"], b"attacker-salt-16"),
             "victim_md5": md5_hash(PASSWORDS["victim_md5"], "victim_md5"),
             "victim_scram": scram_verifier(PASSWORDS["victim_scram"])}
NOTE = "gets an md5 password hash: anyone who reads it can log in as"


def make_spec(c: Compute, extra_db: bool = False) -> dict:
    spec = c.new_spec()
    spec["cluster"]["roles"] = [{"name": n, "encrypted_password": h, "options": None} for n, h in VERIFIERS.items()]
    spec["cluster"]["databases"] = [{"name": "md5db", "owner": "victim_md5", "options": None},
                                    {"name": "scramdb", "owner": "victim_scram", "options": None}]
    if extra_db:
        spec["cluster"]["databases"].append({"name": "otherdb", "owner": "attacker", "options": None})
    return spec


@pytest.fixture(scope="module")
def compute():
    with ControlPlanePeer(None) as cp:
        c = Compute()
        c.args = ["-i", "compute-1", "-p", cp.url, "--control-plane-api", "2023"]
        c.env = {"NEON_CONSOLE_JWT": "jwt"}
        cp.spec = make_spec(c)
        with c:
            c.wait_status("running")
            yield c


def as_role(c: Compute, role: str, password: str, dbname: str = "postgres") -> psycopg.Connection:
    return psycopg.connect(c.conninfo(dbname, user=role, password=password), autocommit=True)


def stolen(c: Compute) -> dict[str, str]:
    """What the attacker, an ordinary spec role, reads from pg_authid."""
    with as_role(c, "attacker", PASSWORDS["attacker"]) as conn:
        return dict(conn.execute("SELECT rolname::text, rolpassword FROM pg_catalog.pg_authid "
                                 "WHERE rolpassword IS NOT NULL").fetchall())


def test_every_spec_role_reads_every_verifier(compute: Compute) -> None:
    hashes = stolen(compute)
    assert hashes["victim_md5"] == "md5" + VERIFIERS["victim_md5"]
    assert hashes["victim_scram"] == VERIFIERS["victim_scram"]
    assert hashes[SUPERUSER].startswith("SCRAM-SHA-256$")  # the embedded default's superuser


def test_an_md5_hash_read_from_the_catalog_logs_in_as_its_role(compute: Compute) -> None:
    """The documented residual risk: the attacker becomes the owner of md5db without its password."""
    offered, ok, error = login_with_hash("127.0.0.1", compute.pg_port, "victim_md5", "md5db",
                                         stolen(compute)["victim_md5"])
    assert offered == AUTH_MD5 and ok, error


def test_a_scram_verifier_read_from_the_catalog_does_not_log_in(compute: Compute) -> None:
    hashes = stolen(compute)
    for role in ("victim_scram", SUPERUSER):
        # pg_hba.conf says md5 for every TCP client; postgres offers SCRAM to a SCRAM role instead
        offered, ok, error = login_with_hash("127.0.0.1", compute.pg_port, role, "postgres", hashes[role])
        assert offered == AUTH_SASL and not ok, (role, offered, error)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            as_role(compute, role, hashes[role]).close()  # the verifier is not the password
    with as_role(compute, "victim_scram", PASSWORDS["victim_scram"], "scramdb") as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == "victim_scram"


def test_each_md5_verifier_is_logged_once(compute: Compute) -> None:
    """Said when the verifier is written, not at every apply: a reconfiguration that keeps it
    says nothing new."""
    line = f"role 'victim_md5' {NOTE} 'victim_md5'"
    # The driver's lines reach compute-ctl's stdout through supervisord's log relay, which runs in
    # its loop: `running` on /status may come before the line does (the loop is warming up then).
    wait_for(lambda: line in compute.output(), 30, "the driver's md5 note in the output")
    assert compute.output().count(line) == 1, compute.output()[-3000:]
    code, body = compute.request("POST", "/configure", {"spec": make_spec(compute, extra_db=True)},
                                 {"Content-Type": "application/json"}, 60)
    assert code == 200, body
    assert json.loads(body)["status"] == "running"
    out = compute.output()
    assert out.count(f"role 'victim_md5' {NOTE}") == 1, out[-3000:]
    assert "role 'victim_scram' gets" not in out and "role 'attacker' gets" not in out
    assert VERIFIERS["victim_md5"] not in out  # the note names the role, never the hash
