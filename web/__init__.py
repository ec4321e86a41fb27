"""dspy-trio's service around the engine: HTTP, SSE and WebSocket on Quart-Trio and Hypercorn
(``dspy-trio serve``), its command line, and a Trio client for it."""
