"""The bare peer of ``benchmarks.hotpath_http``: one Quart-Trio JSON endpoint on Hypercorn's Trio worker.

``POST /echo`` parses the JSON body and returns a small JSON object; nothing else (no auth, no limits, no
ids, no engine). It runs on the same Hypercorn configuration as ``dspy-trio serve``
(:func:`dspy_trio.web.server.hypercorn_config`), so the difference between the two is our web layer and the
engine::

    python -m benchmarks.peer_quart --port 8002
"""

from __future__ import annotations

import argparse
from typing import Any

import trio
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

app = QuartTrio("peer_quart")


@app.post("/echo")
async def echo() -> dict[str, Any]:
    """Parse the JSON body; answer with a small JSON object."""
    data = await request.get_json()
    return {"ok": True, "question": data["inputs"]["question"]}


@app.get("/health")
async def health() -> str:
    return "OK"


def main() -> None:
    from dspy_trio.web.server import hypercorn_config
    from dspy_trio.web.settings import ServiceSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = hypercorn_config(ServiceSettings(host="127.0.0.1", port=args.port))
    trio.run(serve, app, config)  # ended by SIGTERM / SIGKILL


if __name__ == "__main__":
    main()
