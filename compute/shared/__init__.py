"""What the programs share at run time: the state file, supervisord's control socket, the driver's request queue. Imports compute.model and compute.base."""
