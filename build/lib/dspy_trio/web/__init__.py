"""dspy-trio's adapters around the engine: the command line (and, later, the HTTP service)."""
