"""Process plumbing every layer may use: log formats, the start-up trace, prctl, the retry loop. Imports only compute.model."""
