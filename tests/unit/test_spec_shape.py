"""The spec document's shape (compute/model/spec_shape.py): depth, unknown keys, misspellings."""

import json
import random

import pytest

from compute.model.spec import SpecError, SpecShapeError, parse_spec, parse_spec_text, to_document
from compute.model.spec_shape import (MAX_LISTED, MAX_SPEC_DEPTH, edits, misspelling_of, nesting_depth_exceeds,
                                      shape_report, unknown_keys_line)


def spec(**cluster_extra):
    cluster = {"roles": [], "databases": [], "settings": []}
    cluster.update(cluster_extra)
    return {"format_version": 1.0, "cluster": cluster}


def nested(depth: int) -> list:
    doc: list = []
    cur = doc
    for _ in range(depth - 1):
        inner: list = []
        cur.append(inner)
        cur = inner
    return doc


@pytest.mark.parametrize("a,b,d", [("setings", "settings", 1), ("settigns", "settings", 1), ("Settings", "settings", 1),
                                   ("rolse", "roles", 1), ("databse", "databases", 2), ("name", "mode", 3),
                                   ("x" * 100, "settings", 3), ("", "mode", 3)])
def test_edit_distance(a, b, d):
    assert edits(a, b) == d


def test_short_keys_allow_one_edit_only():
    assert misspelling_of("mdoe", ("mode",)) == "mode"
    assert misspelling_of("mod", ("mode",)) == "mode"
    assert misspelling_of("node", ("mode",)) == "mode"
    assert misspelling_of("name", ("mode",)) is None      # two edits: a different word
    assert misspelling_of("clustr_id", ("cluster_id",)) == "cluster_id"
    assert misspelling_of("databse", ("databases",)) == "databases"


def test_depth_is_counted_without_recursion():
    assert not nesting_depth_exceeds(nested(MAX_SPEC_DEPTH))
    assert nesting_depth_exceeds(nested(MAX_SPEC_DEPTH + 1))
    assert nesting_depth_exceeds(nested(100_000))  # far beyond any recursion limit
    assert not nesting_depth_exceeds({"a": [1, "x", None]}, 2)
    assert nesting_depth_exceeds({"a": [{}]}, 2)


def test_the_issue_attack_is_refused_as_a_shape_error():
    """Issue 19: ~970 nested arrays under an unknown key, under 1 MiB."""
    doc = spec()
    doc["padding"] = nested(970)
    text = json.dumps(spec())[:-1] + ', "padding": ' + "[" * 970 + "]" * 970 + "}"
    assert len(text) < 1 << 20
    with pytest.raises(SpecShapeError, match=f"nested deeper than {MAX_SPEC_DEPTH} levels"):
        parse_spec(doc)
    # The same through the text entry point (file, -s), whether json's own recursion limit or
    # the depth check stops it first.
    with pytest.raises(SpecShapeError, match=f"nested deeper than {MAX_SPEC_DEPTH} levels"):
        parse_spec_text(text)


def test_a_deep_neon_field_passes():
    doc = spec()
    doc["remote_extensions"] = {"extension_data": {"anon": {"control_data": {"anon.control": "x"}, "archive_path": "p"}}}
    parsed = parse_spec(doc)
    assert parsed.ignored_keys == ()  # Neon's own fields are known, not "unknown"


@pytest.mark.parametrize("where,key,known", [
    ("cluster", "setings", "settings"),
    ("cluster", "Settings", "settings"),
    ("cluster", "role", "roles"),
    ("top", "clustr", "cluster"),
    ("top", "delta_operation", "delta_operations"),
    ("top", "skip_pg_catalog_update", "skip_pg_catalog_updates"),
    ("top", "moed", "mode"),
])
def test_a_misspelled_key_is_refused_naming_both(where, key, known):
    doc = spec()
    if where == "cluster":
        doc["cluster"][key] = doc["cluster"].pop(known, [])
    elif known == "cluster":
        doc[key] = doc.pop("cluster")
    else:
        doc[key] = [] if known == "delta_operations" else True
    with pytest.raises(SpecShapeError) as e:
        parse_spec(doc)
    assert repr(key) in str(e.value) and repr(known) in str(e.value)
    assert isinstance(e.value, SpecError) and str(e.value).startswith("invalid spec: ")


def test_a_close_key_beside_the_real_one_is_only_unknown():
    doc = spec(setings=[])  # "settings" is there: not a misspelling of it
    parsed = parse_spec(doc)
    assert parsed.ignored_keys == ("cluster.setings",)


def test_misspellings_inside_roles_databases_settings_and_deltas():
    cases = [
        lambda d: d["cluster"]["roles"].append({"name": "a", "encrypted_pasword": "x"}),
        lambda d: d["cluster"]["databases"].append({"name": "db", "ownr": "a"}),
        lambda d: d["cluster"]["settings"].append({"name": "port", "vaule": "5432"}),
        lambda d: d.update(delta_operations=[{"action": "delete_db", "name": "x", "new_nmae": "y"}]),
    ]
    for mutate in cases:
        doc = spec()
        mutate(doc)
        with pytest.raises(SpecShapeError):
            parse_spec(doc, superuser="a")


def test_unknown_keys_are_reported_once_per_place_and_never_stored():
    doc = spec(roles=[{"name": f"r{i}", "colour": i} for i in range(50)])
    doc["mystery"] = {"deep": [1, 2, 3]}
    parsed = parse_spec(doc)
    assert parsed.ignored_keys == ("mystery", "cluster.roles[].colour")
    stored = to_document(parsed)
    assert "mystery" not in stored and "colour" not in json.dumps(stored)
    assert parse_spec(stored).ignored_keys == ()


def test_the_log_line_is_bounded():
    keys = tuple(f"k{i}" + "x" * 500 for i in range(1000))
    line = unknown_keys_line(keys)
    assert len(line) < 2000 and line.endswith(f"and {1000 - MAX_LISTED} more")
    assert unknown_keys_line(("a", "b")) == "spec keys ignored (not known to this version): 'a', 'b'"


def test_non_objects_are_left_to_the_parser():
    assert shape_report([1, 2]).unknown == ()
    with pytest.raises(SpecError, match="expected an object"):
        parse_spec([1, 2])
    with pytest.raises(SpecError, match="cluster.roles: expected list"):
        parse_spec(spec(roles={"setings": 1}))


def full_osa(a: str, b: str) -> int:
    """The whole optimal-string-alignment table, uncapped: the reference `edits` must agree with."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_the_banded_distance_agrees_with_the_whole_table():
    rng = random.Random(20)
    for _ in range(3000):
        a = "".join(rng.choice("ab_") for _ in range(rng.randint(0, 8)))
        b = "".join(rng.choice("ab_") for _ in range(rng.randint(0, 8)))
        for cap in (1, 2, 3, 4):
            assert edits(a, b, cap) == min(full_osa(a, b), cap), (a, b, cap)


def test_the_letter_filter_never_hides_a_misspelling():
    known = ("settings", "roles", "mode", "cluster_id", "encrypted_password", "new_name")
    rng = random.Random(21)
    for _ in range(3000):
        word = list(rng.choice(known))
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(word) + 1)
            step = rng.choice("dis") if word else "i"
            if step == "d" and at < len(word):
                del word[at]
            elif step == "i":
                word.insert(at, rng.choice("sxe_"))
            elif at < len(word):
                word[at] = rng.choice("sxe_")
        key = "".join(word)
        scored = [(full_osa(key, k), k) for k in known]
        close = [(d, k) for d, k in scored if d <= (1 if len(k) <= 5 else 2)]
        assert misspelling_of(key, known) == (min(close, key=lambda c: c[0])[1] if close else None), key


def many_junk_keys(n: int = 30_000) -> dict:
    # the e2e test's junk, plus keys made of the letters of keys we read (the letter filter lets
    # those through to the distance table) and of their length
    junk = {f"junk_{i:05d}_{'x' * 10}": i for i in range(n // 2)}
    junk.update({f"{'pageserver_connstring'[:12]}{i:09d}": i for i in range(n - len(junk))})
    return junk


def test_thirty_thousand_unknown_keys_give_the_same_answer():
    doc = spec(settings=[{"name": "port", "value": "5432", "vartype": "integer"}])
    junk = many_junk_keys()
    doc.update(junk)
    parsed = parse_spec(doc)
    assert parsed.ignored_keys == tuple(junk)  # each once, in document order
    assert to_document(parsed) == to_document(parse_spec(spec(settings=doc["cluster"]["settings"])))
    line = unknown_keys_line(parsed.ignored_keys)
    assert line.endswith(f"and {len(junk) - MAX_LISTED} more") and len(line) < 2500


@pytest.mark.parametrize("key,known", [("pageserver_connstrng", "pageserver_connstring"),
                                       ("fromat_version", "format_version"), ("moed", "mode")])
def test_a_misspelling_among_thirty_thousand_unknown_keys_is_still_refused(key, known):
    doc = spec()
    doc.update(many_junk_keys())
    value = doc.pop(known, True)
    doc[key] = value  # last, after all the junk
    with pytest.raises(SpecShapeError) as e:
        parse_spec(doc)
    assert repr(key) in str(e.value) and repr(known) in str(e.value)
    report = shape_report(doc)
    assert [(m.key, m.known) for m in report.misspellings] == [(key, known)]
    assert len(report.unknown) == 30_001
