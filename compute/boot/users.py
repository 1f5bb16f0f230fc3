"""Running as an unprivileged user when started as root (postgres refuses root)."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass


@dataclass(frozen=True)
class RunAs:
    name: str
    uid: int
    gid: int
    home: str

    @classmethod
    def lookup(cls, name: str) -> "RunAs":
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise ValueError(f"user {name!r} does not exist") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)

    @classmethod
    def current(cls) -> "RunAs":
        try:
            pw = pwd.getpwuid(os.getuid())
        except KeyError:
            # initdb and postgres look their user up by uid (a pod's runAsUser the image does not know)
            raise ValueError(f"compute-ctl runs as uid {os.getuid()}, which has no entry in /etc/passwd: "
                             "postgres and initdb need a user name for it. Run as a user the image "
                             "knows (the image's USER, 999: postgres; in Kubernetes runAsUser: 999) or "
                             "add the uid to /etc/passwd") from None
        return cls(pw.pw_name, pw.pw_uid, pw.pw_gid, pw.pw_dir)

    def demote(self) -> None:
        """Drop root for good: supplementary groups, gid, then uid (order matters)."""
        if os.getuid() != 0:
            return
        os.initgroups(self.name, self.gid)
        os.setgid(self.gid)
        os.setuid(self.uid)
        os.environ["HOME"] = self.home
        os.environ["USER"] = os.environ["LOGNAME"] = self.name

    def chown(self, path: str) -> None:
        if os.getuid() == 0:
            os.chown(path, self.uid, self.gid)


def effective_user(requested: str) -> RunAs:
    """As root: the requested unprivileged user. Otherwise: whoever we are."""
    if os.getuid() == 0:
        user = RunAs.lookup(requested)
        if user.uid == 0:
            raise ValueError("--user must name an unprivileged user: postgres refuses to run as root")
        return user
    return RunAs.current()
