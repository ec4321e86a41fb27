"""The peer: DSPy's documented serving recipe, FastAPI + uvicorn + ``dspy.asyncify`` (and ``dspy.streamify``
for streaming), with the stock ``dspy.LM``. Configured from the environment by benchmarks/serving.py::

    PEER_API_BASE=http://127.0.0.1:8001/v1 PEER_WORKERS=8 uvicorn benchmarks.peer_fastapi:app
"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

lm = dspy.LM(
    "openai/bench", api_base=os.environ["PEER_API_BASE"], api_key="sk-bench", cache=False, num_retries=0
)
dspy.configure(
    lm=lm, async_max_workers=int(os.environ.get("PEER_WORKERS", "8")), max_trace_size=0, disable_history=True
)
program = dspy.Predict("question -> answer")
async_program = dspy.asyncify(program)
app = FastAPI()


class Question(BaseModel):
    question: str


@app.get("/health")
async def health() -> str:
    return "OK"


@app.post("/predict")
async def predict(body: Question) -> dict[str, str]:
    result = await async_program(question=body.question)
    return {"answer": result.answer}


@app.post("/stream")
async def stream(body: Question) -> StreamingResponse:
    streaming = dspy.streamify(program, stream_listeners=[dspy.streaming.StreamListener("answer")])
    return StreamingResponse(
        dspy.streaming.streaming_response(streaming(question=body.question)), media_type="text/event-stream"
    )
