"""Programs importable by path in tests (``tests.sample_programs.qa:...``)."""

from __future__ import annotations

import dspy


class Classify(dspy.Signature):
    """Classify a text."""

    text: str = dspy.InputField()
    count: int = dspy.InputField()
    label: str = dspy.OutputField()


class TwoStep(dspy.Module):
    def __init__(self) -> None:
        super().__init__()
        self.draft = dspy.Predict("question -> draft")
        self.polish = dspy.ChainOfThought("question, draft -> answer")

    async def aforward(self, question: str, style: str = "plain") -> dspy.Prediction:
        draft = await self.draft.acall(question=question)
        return await self.polish.acall(question=f"{question} ({style})", draft=draft.draft)


class SyncOnly(dspy.Module):
    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=question)


two_step = TwoStep()
