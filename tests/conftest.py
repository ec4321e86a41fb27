"""The project's own tests load the engine's pytest plugin explicitly, as any user's project would."""

pytest_plugins = ["engine.testing.pytest_plugin"]
