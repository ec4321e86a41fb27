"""The dspy-trio command line."""

from __future__ import annotations

import json

import pytest

from web.cli import main


def test_predict_prints_outputs_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("LM_PROVIDER", "LM_API_BASE", "LM_MODEL", "DSPY_TRIO_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    assert main(["predict", "What is Trio?"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["program"] == "default"
    assert report["outputs"]["answer"]
    assert report["usage"]["completion_tokens"] > 0


def test_bad_input_is_a_clear_error_and_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--input", "nope=1"]) == 2
    assert "InvalidInputError: unknown input field 'nope'" in capsys.readouterr().err
