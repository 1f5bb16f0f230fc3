"""How this process was forked from compute-ctl's warm image: set by compute.tree.warmfork
before it forks a program, read by the program (which must not import the tree)."""

import os

fully_warm = False  # forked from the whole warm image (every program but the first start's driver)
# The first start's driver, forked by compute-ctl before supervisord runs (compute/tree/early_driver.py):
# it starts the storage request before importing the rest of itself (compute/lifecycle/early.py).
forked_early = False
# In that driver: (launch settings, spec) as compute-ctl wrote them to the state file just before the
# fork, as objects: its first look at the plan parses neither again (~10-30 ms).
bootstrap_objects: tuple | None = None
# In that driver: a pipe to compute-ctl, written once its storage request is started (or known to
# be none): compute-ctl waits for it, briefly, before its own imports (compute/tree/early_driver.py).
early_ready_fd: int | None = None
# In that driver: a pipe from compute-ctl, which creates the state file after the fork (the
# storage request does not need it) and then writes the variables that come with it, once, and
# closes the pipe (compute/tree/early_driver.py state_file_ready). Read by wait_for_state_file.
state_ready_fd: int | None = None


def wait_for_state_file() -> None:
    """In the first start's early driver, before its first read of the state file: wait until
    compute-ctl has created it, and add the variables compute-ctl sends with it (`NAME=value`
    lines: the file's identity) to os.environ. SystemExit(1) when the pipe closes without them:
    compute-ctl's bootstrap failed after the fork (it stops this driver, or has died: the
    parent-death signal). Returns at once in any other driver."""
    global state_ready_fd
    fd, state_ready_fd = state_ready_fd, None
    if fd is None:
        return
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    finally:
        os.close(fd)
    if not data.endswith(b"\n"):
        raise SystemExit(1)
    os.environ.update(parse_environment_lines(data.decode()))


def parse_environment_lines(text: str) -> dict[str, str]:
    """`NAME=value` lines (pure): what compute-ctl sends with the state file."""
    return dict(line.split("=", 1) for line in text.splitlines() if line)
