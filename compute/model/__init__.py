"""Pure data and decisions every layer shares: the spec, modes, the launch settings, which secret goes where. Imports nothing of compute."""
