"""compute-ctl itself: flags, validation, paths and users, the early responder, then the tree."""
