"""A program of your own, served by dspy-trio (see examples/my_programs.toml).

The engine awaits programs natively, so a custom ``dspy.Module`` must define ``async def aforward`` and
call its predictors with ``await ....acall(...)``; its parameters are the request's input fields.
"""

from __future__ import annotations

import dspy


class AnswerWithSource(dspy.Signature):
    """Answer the question in one sentence and name the kind of source it comes from."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    source: str = dspy.OutputField(desc="e.g. documentation, textbook, common knowledge")


class Cite(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.respond = dspy.Predict(AnswerWithSource)

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.respond.acall(question=question)


cite = Cite()
