"""The contract with the pinned DSPy that the engine's LM backends rely on.

DSPy plans to change the LM interface (3.5 moves to Request/Response engines). When this file fails
after a DSPy upgrade, the backends in engine/lm/ need the same change.
"""

from __future__ import annotations

from typing import Any

import dspy
import trio
from dspy.streaming import StreamListener

from engine.lm import ChunkSink, TrioLM
from engine.lm._base import Completion


def test_dspy_version_is_the_pinned_one() -> None:
    assert dspy.__version__ == "3.4.1"


class RecordingLM(TrioLM):
    def __init__(self, answer: str) -> None:
        super().__init__("contract/lm", temperature=0.0)
        self.answer = answer
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    async def acall(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.calls.append((messages, kwargs))
        return await super().acall(prompt, messages, **kwargs)

    async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
        await trio.lowlevel.checkpoint()
        return Completion([self.answer], {"prompt_tokens": 3, "completion_tokens": 4})


async def test_adapters_await_acall_with_chat_messages_and_parse_a_list_of_strings() -> None:
    lm = RecordingLM("[[ ## answer ## ]]\nBlue.\n\n[[ ## completed ## ]]")
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        prediction = await dspy.Predict("question -> answer").acall(question="Sky colour?")
    assert prediction.answer == "Blue."
    [(messages, kwargs)] = lm.calls
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(isinstance(m["content"], str) for m in messages)
    assert "[[ ## answer ## ]]" in messages[0]["content"]
    assert "Sky colour?" in messages[1]["content"]
    assert kwargs == {}


async def test_usage_reported_by_acall_reaches_dspys_usage_tracker() -> None:
    lm = RecordingLM("[[ ## answer ## ]]\nBlue.\n\n[[ ## completed ## ]]")
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        await dspy.Predict("question -> answer").acall(question="Sky colour?")
    assert tracker.get_total_tokens() == {"contract/lm": {"prompt_tokens": 3, "completion_tokens": 4}}


async def test_predict_sets_send_stream_and_caller_predict_for_the_lm() -> None:
    seen: dict[str, Any] = {}

    class Spy(RecordingLM):
        async def complete(self, messages: Any, params: Any, sink: ChunkSink | None) -> Completion:
            seen["sink"] = sink
            return await super().complete(messages, params, sink)

    send, _receive = trio.open_memory_channel[Any](10)
    program = dspy.Predict("question -> answer")
    with dspy.context(lm=Spy("[[ ## answer ## ]]\nx\n\n[[ ## completed ## ]]"), send_stream=send):
        await program.acall(question="q")
    assert seen["sink"] is not None
    assert seen["sink"].predict_id == id(program)


async def test_stream_listener_understands_the_chunks_the_backends_send() -> None:
    program = dspy.Predict("question -> answer")
    listener = StreamListener("answer", predict=program)
    send, receive = trio.open_memory_channel[Any](1)
    sink = ChunkSink(send, "m", id(program))
    pieces = ["[[ ", "## answer ## ]]\n", "Blue ", "sky ", "today.", "\n\n[[ ## completed ## ]]"]
    out = []
    with dspy.context(adapter=dspy.ChatAdapter()):
        for piece in pieces:
            await sink.send(piece)
            chunk = receive.receive_nowait()
            assert chunk.predict_id == id(program)
            if response := listener.receive(chunk):
                out.append(response.chunk)
        if final := listener.finalize():
            out.append(final.chunk)
    assert "".join(out) == "Blue sky today."
