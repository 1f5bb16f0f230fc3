"""The spec document's shape (compute/model/spec_shape.py): depth, unknown keys, misspellings."""

import json

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
