"""How this process was forked from compute-ctl's warm image: set by compute.tree.warmfork
before it forks a program, read by the program (which must not import the tree)."""

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
