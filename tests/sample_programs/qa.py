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


class Rollouts(dspy.Module):
    """Asks for three samples the way DSPy's BestOfN and Refine do: copies of the LM with distinct
    ``rollout_id``s at temperature 1, the first and the third with the same id."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    async def aforward(self, question: str) -> dspy.Prediction:
        answers = []
        for rollout in (1, 2, 1):
            with dspy.context(lm=dspy.settings.lm.copy(rollout_id=rollout, temperature=1.0)):
                answers.append((await self.predict.acall(question=question)).answer)
        return dspy.Prediction(answer=" | ".join(answers))
