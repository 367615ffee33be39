"""Training on one node: the supervisor and its processes (server, workers, validator), the
pure update rule, the simulator, the run directory and its log, and `pyasgd-train`."""
