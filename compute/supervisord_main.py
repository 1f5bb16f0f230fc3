"""supervisord with prompt restarts: `python -m compute.supervisord_main -n -c CONF`.

supervisord 4.3's main loop is poll(timeout=1 s) -> transition() -> reap(). A SIGCHLD does not
end the poll (PEP 475 retries it), and a program reaped at the end of one turn is respawned by
the transition() of the next one: a crashed program comes back 1-2 s later. Here any signal
ends the poll (signal.set_wakeup_fd), and a turn that reaped a child is followed by another at
once, so a crashed program is respawned within milliseconds. Idle cost: none.

While it shuts down, a turn waits at most SHUTDOWN_TICK: supervisord stops one priority group
per turn, and nobody may be left to poke its control socket (compute-ctl killed outright: our
parent-death signal is what started the shutdown).
"""

from __future__ import annotations

import os
import select
import signal

from supervisor import options, poller, supervisord
from supervisor.states import SupervisorStates

from .procutil import COMPUTE_CTL_PID_ENV, SUPERVISORD_PID_ENV, die_with_parent

SHUTDOWN_TICK = 0.05


class PromptPoller(poller.PollPoller):
    def initialize(self) -> None:
        super().initialize()
        self.again = False
        self._wake_r, wake_w = os.pipe()  # close-on-exec: children never see it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        self._poller.register(self._wake_r, select.POLLIN)
        signal.set_wakeup_fd(wake_w)  # a byte per signal (SIGCHLD), whatever the handler

    def poll(self, timeout):
        if self.again:
            self.again, timeout = False, 0
        elif self.options.mood < SupervisorStates.RUNNING:
            timeout = min(timeout, SHUTDOWN_TICK)
        readables, writables = super().poll(timeout)
        if self._wake_r in readables:
            readables.remove(self._wake_r)
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return readables, writables


_waitpid = options.ServerOptions.waitpid


def _waitpid_then_turn_again(self):
    pid, sts = _waitpid(self)
    if pid and isinstance(self.poller, PromptPoller):
        self.poller.again = True  # the next transition() respawns it: do not wait 1 s for it
    return pid, sts


def main() -> None:
    # compute-ctl killed outright (even before this line): shut the tree down in order.
    die_with_parent(signal.SIGTERM, parent_env=COMPUTE_CTL_PID_ENV)
    os.environ[SUPERVISORD_PID_ENV] = str(os.getpid())  # the programs' own check (procutil)
    poller.Poller = PromptPoller
    options.ServerOptions.waitpid = _waitpid_then_turn_again
    supervisord.main()


if __name__ == "__main__":
    main()
