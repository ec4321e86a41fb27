"""OpenAI's API over the served programs: each program is a model, a chat completion one call of it.

Errors are in OpenAI's shape and statuses, so the OpenAI SDKs raise their own types: bad input is a 400
(``BadRequestError``; the service's other routes say 422), an unknown program an unknown model (404
``model_not_found``, ``NotFoundError``), a refused key 401, an overload 429 with ``Retry-After``, the
deadline 504 (the body not arriving in time 408). What a request means for its program is
:mod:`dspy_trio.web.chat`; the answer's wire formats are :mod:`dspy_trio.web.formats` (``chat_json``,
``ChatChunks``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from quart import Response

from dspy_trio.engine import InvalidInputError, ProgramInfo, UnknownProgramError

from .call import Call
from .chat import ChatCall, ChatRequest
from .errors import HTTPError
from .formats import ChatAnswer, ChatChunks, chat_json
from .http import checked_engine, json_body, json_response, streamed_response
from .runner import Emit, predict, run
from .service import Service
from .sse import EventBody

_OWNER = "dspy-trio"
# When the programs became models, as OpenAI's ``created`` says of a model (Unix seconds).
_CREATED = int(time.time())


def _model(info: ProgramInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": _CREATED, "owned_by": _OWNER}


def _unknown_model(name: str, known: list[str]) -> HTTPError:
    return HTTPError(
        404,
        f"The model {name[:256]!r} does not exist: the served programs are {', '.join(known) or 'none'}",
        type="invalid_request_error",
        code="model_not_found",
        param="model",
    )


def _program(service: Service, name: str) -> ProgramInfo:
    """The program a model name names.

    Raises:
        HTTPError: 404 ``model_not_found``; 503 ``not_ready``.
    """
    programs = service.require_engine().programs()
    found = next((info for info in programs if info.name == name), None)
    if found is None:
        raise _unknown_model(name, [info.name for info in programs])
    return found


def openai_errors(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Answer a handler's bad input in OpenAI's statuses: a 422 of the web layer or the engine's
    ``invalid_input`` becomes a 400 (the same code, message and ``param``), an unknown program an unknown
    model."""

    @functools.wraps(handler)
    async def wrapper(service: Service, call: Call, **parameters: Any) -> Response:
        try:
            return await handler(service, call, **parameters)
        except HTTPError as error:
            if error.status != 422:
                raise
            raise HTTPError(400, error.message, type=error.type, code=error.code, param=error.param) from None
        except UnknownProgramError as error:
            programs = service.engine.programs() if service.engine is not None else []
            raise _unknown_model(error.program, [info.name for info in programs]) from None
        except InvalidInputError as error:
            raise HTTPError(
                400, error.message, type="invalid_request_error", code=error.code, param=error.field
            ) from None

    return wrapper


async def list_models(service: Service, call: Call) -> Response:
    """Every served program as a model: ``{"object": "list", "data": [{"id", "object": "model", ...}]}``."""
    programs = service.require_engine().programs()
    return json_response({"object": "list", "data": [_model(info) for info in programs]})


@openai_errors
async def get_model(service: Service, call: Call, model: str) -> Response:
    """One served program as a model; 404 ``model_not_found`` for a name no program has."""
    return json_response(_model(_program(service, model)))


@openai_errors
@json_body(ChatRequest)
async def chat_completions(service: Service, call: Call, data: ChatRequest) -> Response:
    """A chat completion: ``model`` names the program, the messages are its inputs, ``content`` its
    outputs; streamed as ``chat.completion.chunk`` events with ``stream: true``."""
    info = _program(service, data.model)
    engine = service.require_engine()
    engine.refuse_if_overloaded(
        info.name, tenant=call.tenant
    )  # before the messages are read (counted as a refusal)
    chat = ChatCall.of(data, info, service.settings)
    until = call.deadline(service.settings, data.timeout, param="timeout")
    checked_engine(service, chat.inputs)
    answer = ChatAnswer(
        f"chatcmpl-{call.request_id}", int(time.time()), info.name, chat.json_object, chat.schema
    )
    if not chat.stream:
        result = await predict(engine, call, until, info.name, chat.inputs, lm_params=chat.lm_params)
        return json_response(chat_json(answer, result))
    engine.precheck(
        info.name, chat.inputs, tenant=call.tenant
    )  # bad input and overload get a status, not an event

    async def produce(emit: Emit) -> None:
        await run(
            engine, call, until, info.name, chat.inputs, stream=True, emit=emit, lm_params=chat.lm_params
        )

    encode = ChatChunks(answer, info, include_usage=chat.include_usage)
    return streamed_response(EventBody(produce, keepalive=service.settings.sse_keepalive, encode=encode))


__all__ = ["chat_completions", "get_model", "list_models", "openai_errors"]
