"""`ksm-proto check`: the interleaving checker (scheduling, scenarios, invariants) that runs the
very cores the actors run, in one process.
"""
