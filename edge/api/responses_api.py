"""`POST /v1/responses`: OpenAI's Responses API on the OpenAI port (and, through it, on the
Ollama port), a thin adapter over the HTTP runtime: the request becomes a chat request
(`responses_shape.chat_request`), runs like a chat completion, and comes back as a
`response` object or its stream of events (`response.created` ... `response.completed`).
Stateless: every request carries the whole conversation.
"""
from __future__ import annotations

import functools
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from edge.api.openai_schema import ERRORS
from edge.api.responses_shape import ResponseShape, chat_request
from edge.api.models import ready, using
from edge.api.runtime import (ApiError, JobStream, StateDep, admit, api_error, chat_prompt,
                              check_bytes, job_events, loop_guard, message_bytes, request_params, tokenize,
                              whole_answer)
from edge.engine import ContextFull, SequenceFailed
from edge.engine.replies import astream
from edge.engine.tool_calls import ToolError

router = APIRouter()

# Responses API field -> RequestDefaults field, with the JSON type it must have
SAMPLING = {"max_output_tokens": ("max_tokens", int), "temperature": ("temperature", (int, float)),
            "top_p": ("top_p", (int, float))}


@router.post("/v1/responses")
async def responses(request: Request, state: StateDep):
    ready(state)
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(400, f"the body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    name = body.get("model")      # a model this server does not run is a 404, as on chat completions
    state = await using(request, state, name if isinstance(name, str) and name else None)
    engine = state.engine
    try:
        req = chat_request(body)
    except ToolError as e:
        raise ApiError(400, str(e), param=e.param) from e
    fields = _sampling(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    nbytes = message_bytes(req["messages"])
    check_bytes(engine, nbytes, "input")
    with admit(state, ERRORS) as ticket:
        prompt = functools.partial(chat_prompt, engine, tools=req["tools"], tool_choice=req["tool_choice"],
                                   parallel_tool_calls=req["parallel_tool_calls"],
                                   response_format=req["response_format"],
                                   tool_loop_guard=loop_guard(state, body.get("tool_loop_guard")), clock_last=state.config.clock_last)
        chat = await tokenize(state, prompt, req["messages"], "input", nbytes)
        params = request_params(state, chat.ids, "input", **fields, **chat.overrides())
        job = state.scheduler.submit(chat.ids, params, time_limit=state.config.request_timeout, ticket=ticket)
    shape = ResponseShape(body, state.model_id)
    tool_use = chat.tool_use if chat.tool_use is not None and chat.tool_use.active else None
    if stream:
        return JobStream(job, _events(state, job, shape, tool_use))
    answer = await whole_answer(request, state, ERRORS, job, tool_use)
    status, reason = shape.status(answer.final.finish_reason if answer.final else "cancelled")
    return JSONResponse(shape.response(status, shape.output(answer.content, answer.tool_calls), answer.usage, reason))


def _sampling(body: dict) -> dict:
    out = {}
    for name, (field, kind) in SAMPLING.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ApiError(400, f"{name} must be a number", param=name)
        out[field] = value
    return out


async def _events(state, job, shape: ResponseShape, tool_use) -> AsyncIterator[str]:
    yield shape.event("response.created", response=shape.response("in_progress", []))
    yield shape.event("response.in_progress", response=shape.response("in_progress", []))
    text, opened = "", False
    try:
        async for piece in astream(job_events(job, state.scheduler), tool_use):
            if piece.text:
                if not opened:
                    opened = True
                    yield shape.event("response.output_item.added", output_index=0,
                                      item=shape.message("", status="in_progress"))
                    yield shape.event("response.content_part.added", item_id=shape.msg_id, output_index=0,
                                      content_index=0, part=shape.part(""))
                text += piece.text
                yield shape.event("response.output_text.delta", item_id=shape.msg_id, output_index=0,
                                  content_index=0, delta=piece.text, logprobs=[])
            if piece.final is not None:
                output = []
                async for ev in _closing(shape, text if opened else None, piece.tool_calls, output):
                    yield ev
                status, reason = shape.status(piece.final.finish_reason)
                yield shape.event(f"response.{status}", response=shape.response(status, output, piece.final.usage, reason))
    except (ContextFull, SequenceFailed) as e:
        err = api_error(state, ERRORS, e)
        yield shape.event("error", code=err.code, message=err.message, param=err.param)
    except Exception as e:        # mid-stream: the status is sent already, so say it in the stream
        yield shape.event("error", code="server_error", message=f"generation failed: {e}", param=None)


async def _closing(shape: ResponseShape, text: str | None, calls, output: list) -> AsyncIterator[str]:
    """The message's closing events, then each call as an item of its own."""
    if text is not None:
        yield shape.event("response.output_text.done", item_id=shape.msg_id, output_index=0, content_index=0,
                          text=text, logprobs=[])
        yield shape.event("response.content_part.done", item_id=shape.msg_id, output_index=0, content_index=0,
                          part=shape.part(text))
        output.append(shape.message(text))
        yield shape.event("response.output_item.done", output_index=0, item=output[-1])
    for call in calls:
        index, item = len(output), shape.call(call, status="in_progress", arguments="")
        yield shape.event("response.output_item.added", output_index=index, item=item)
        yield shape.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                          delta=call.arguments_json)
        yield shape.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          arguments=call.arguments_json)
        output.append({**item, "arguments": call.arguments_json, "status": "completed"})
        yield shape.event("response.output_item.done", output_index=index, item=output[-1])
