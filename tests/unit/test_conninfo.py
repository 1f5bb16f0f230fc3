"""compute/model/conninfo.py reads the plain forms itself: always libpq's own answer (psycopg's
conninfo_to_dict, PQconninfoParse), and libpq's refusal for what libpq refuses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

from compute.model.conninfo import ConninfoError, _parse_plain, parse

NAME = st.text("abcXYZ019_.-", min_size=1, max_size=12)
PLAIN = st.text("abcXYZ019_.:/@+-", min_size=1, max_size=12)
KEYWORDS = st.sampled_from(["host", "hostaddr", "port", "dbname", "user", "password", "passfile",
                            "connect_timeout", "application_name", "sslmode", "target_session_attrs",
                            "options", "nosuch", "service", "keepalives"])


def libpq(connstr: str):
    try:
        return conninfo_to_dict(connstr)
    except ProgrammingError as e:
        return ("error", str(e))


def ours(connstr: str):
    try:
        return parse(connstr)
    except ConninfoError as e:
        return ("error", str(e))


@st.composite
def uris(draw):
    scheme = draw(st.sampled_from(["postgres://", "postgresql://"]))
    user = draw(st.one_of(st.none(), NAME))
    password = draw(st.one_of(st.none(), NAME)) if user else None
    host = draw(NAME)
    port = draw(st.one_of(st.none(), st.integers(0, 99999).map(str)))
    dbname = draw(st.one_of(st.none(), NAME))
    s = scheme + (f"{user}{':' + password if password else ''}@" if user else "") + host
    s += f":{port}" if port else ""
    s += f"/{dbname}" if dbname is not None else ""
    return s + draw(st.sampled_from(["", "", "?sslmode=disable", "/", "%41", ",h2"]))


@st.composite
def pairs(draw):
    items = draw(st.lists(st.tuples(KEYWORDS, PLAIN), min_size=1, max_size=5))
    sep = draw(st.sampled_from([" ", "  ", " \t"]))
    return draw(st.sampled_from(["", " "])) + sep.join(f"{k}={v}" for k, v in items) + draw(st.sampled_from(["", " "]))


@settings(max_examples=300, deadline=None)
@given(st.one_of(uris(), pairs()))
def test_the_plain_forms_read_as_libpq_reads_them(connstr: str) -> None:
    assert ours(connstr) == libpq(connstr)


@pytest.mark.parametrize("connstr", [
    "postgresql://cloud_admin@127.0.0.1:55432/postgres", "postgres://u:p@h", "host=/tmp port=5 user=x",
    "user=a user=b", "postgresql://u@localhost", "host=a.b-c_d port=0012",
    # anything else: libpq decides (its answer, or its refusal, word for word)
    "postgresql://%41@h/d", "postgresql://u@h/d?application_name=x", "postgresql://[::1]:5/d",
    "postgresql://a,b/d", "user='x y'", "user=x\\ y", "user = x", "nosuch=1", "user", "user='x",
    "postgresql://u@h:5:5/d", "", "   ", "postgresql://", "postgresql:///db", "host=a port=",
])
def test_known_cases_against_libpq(connstr: str) -> None:
    assert ours(connstr) == libpq(connstr)


def test_the_fast_path_never_answers_what_it_does_not_know() -> None:
    for connstr in ("nosuch=1", "options=-cx", "user='x'", "postgresql://u@h?x=1", "postgresql://u@[::1]"):
        assert _parse_plain(connstr) is None


def test_a_refusal_is_a_conninfo_error_without_psycopgs_type() -> None:
    with pytest.raises(ConninfoError, match="missing \"=\" after \"user\""):
        parse("user")
    assert issubclass(ConninfoError, ValueError)
