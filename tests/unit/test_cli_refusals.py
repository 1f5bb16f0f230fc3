"""compute-ctl's flags refused with a sentence saying what was found and the fix (issue 20, item 4)."""

import pytest


def test_an_exporter_the_image_lacks_is_a_sentence_naming_the_build_arg():
    """The old manifest passed --postgres-exporter to an image built without it."""
    from compute.boot.cli import UsageError, build_parser, validate_flags
    args = build_parser().parse_args(["-D", "/x", "-C", "postgresql://cloud_admin@127.0.0.1:1/postgres",
                                      "-s", "{}", "--postgres-exporter", "/nonexistent/prometheus-postgres-exporter"])
    with pytest.raises(UsageError, match="no such file.*WITH_POSTGRES_EXPORTER=1"):
        validate_flags(args)


def test_pgbin_refusals_say_what_is_wrong(tmp_path):
    from compute.boot.cli import UsageError, resolve_pgbin
    with pytest.raises(UsageError, match=r"no executable 'postgres' on PATH \(/nowhere\).*full path"):
        resolve_pgbin("postgres", path="/nowhere")
    with pytest.raises(UsageError, match="no such file"):
        resolve_pgbin(str(tmp_path / "postgres"))
    plain = tmp_path / "postgres"
    plain.write_text("")
    plain.chmod(0o644)
    with pytest.raises(UsageError, match="not an executable file.*mode 0644"):  # root too: no x bit
        resolve_pgbin(str(plain))
    with pytest.raises(UsageError, match="not an executable file.*a directory"):
        resolve_pgbin(str(tmp_path))
