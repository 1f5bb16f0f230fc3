"""The demo binds loopback (issue 20 item 5): scripts/demo, the image's default command and the
demo spec they share. The demo run and its listening sockets: tests/e2e/test_e2e_day_two.py."""

from __future__ import annotations

import json
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(*path: str) -> str:
    with open(os.path.join(REPO, *path)) as f:
        return f.read()


def test_the_demo_spec_listens_on_loopback():
    settings = {s["name"]: s["value"] for s in json.loads(read("conf", "demo-spec.json"))["cluster"]["settings"]}
    assert settings["listen_addresses"] == "127.0.0.1"


def test_the_demo_script_and_the_image_bind_the_api_to_loopback_with_that_spec():
    demo = read("scripts", "demo")
    command = demo[demo.index('exec "$venv/bin/compute-ctl"'):]
    assert "--http-address 127.0.0.1" in command and '"$repo/conf/demo-spec.json"' in command
    assert command.rstrip().endswith('"$@"')  # the caller's flags come last: they win
    docker = read("Dockerfile")
    cmd = docker[docker.index("CMD ["):]
    assert '"/etc/compute/demo-spec.json"' in cmd and '"--http-address", "127.0.0.1"' in cmd
    assert re.search(r"cp /src/conf/demo-spec.json /etc/compute/demo-spec.json", docker)
