"""An MCP client on the official Python SDK (`mcp` on PyPI: `mcp.client.Client`)
that runs a script of steps against one Streamable HTTP endpoint, for
Chaperone's end-to-end tests of MCP 2026-07-28.

    client.py MODE URL [--header "Name: value"]... [--tasks] [STEPS]

MODE is the SDK's `mode`: `auto` (server/discover, falling back to the
initialize handshake), `2026-07-28` (pinned, no probe) or `legacy` (the
initialize handshake). `--tasks` declares the `io.modelcontextprotocol/tasks`
extension on every request; a `resultType: "task"` answer to tools/call is
then polled with tasks/get until it ends. STEPS is a JSON array (the last
argument, else stdin); each step is an object with `op`:

  {"op": "list_tools"}
  {"op": "call", "tool": NAME, "arguments": {...},
   "answer": {"action": "accept", "content": {...}}}
      `answer` is given to every elicitation the call asks for (through
      `input_required` on 2026-07-28); without one, elicitations are declined.
  {"op": "task_get" | "task_cancel", "taskId": ID}
  {"op": "task_update", "taskId": ID, "inputResponses": {...}}
      ID "@last" is the task the last task-augmented call created.

Any step may carry "traceparent": a W3C traceparent made the ambient
OpenTelemetry context for that step, which the SDK injects into each request's
`params._meta.traceparent` itself (SEP-414).

Prints one JSON line when connected ({"op": "connect", "ok", "protocolVersion"})
and one per step: {"op", "ok": true, ...outcome} or {"op", "ok": false,
"code": JSON-RPC error code or null, "message"}. Outcomes: list_tools
{"tools": [names], "ttlMs", "cacheScope"}; call {"isError", "text",
"inputRounds": elicitations answered, "taskId", "taskPolls"} (a failed call
also has "inputRounds"); task_* {"taskId", "result"}.
Exits 0 unless the arguments are unusable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import mcp_types as types
from mcp.client import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from pydantic import ConfigDict, Field, TypeAdapter

TASKS = "io.modelcontextprotocol/tasks"
TERMINAL = ("completed", "failed", "cancelled")
_ANY = TypeAdapter(dict[str, Any])


class TaskIdParams(types.RequestParams):
    model_config = ConfigDict(populate_by_name=True, extra="allow")
    task_id: str = Field(alias="taskId")


class TaskUpdateParams(TaskIdParams):
    input_responses: dict[str, Any] = Field(alias="inputResponses", default_factory=dict)


class GetTaskRequest(types.Request[TaskIdParams, Literal["tasks/get"]]):
    method: Literal["tasks/get"] = "tasks/get"
    params: TaskIdParams
    name_param: ClassVar[str | None] = "taskId"


class CancelTaskRequest(types.Request[TaskIdParams, Literal["tasks/cancel"]]):
    method: Literal["tasks/cancel"] = "tasks/cancel"
    params: TaskIdParams
    name_param: ClassVar[str | None] = "taskId"


class UpdateTaskRequest(types.Request[TaskUpdateParams, Literal["tasks/update"]]):
    method: Literal["tasks/update"] = "tasks/update"
    params: TaskUpdateParams
    name_param: ClassVar[str | None] = "taskId"


class CreateTaskResult(types.Result):
    """A task handle: `resultType: "task"` and the task's fields, flat."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    result_type: Literal["task"] = Field(alias="resultType", default="task")
    task_id: str = Field(alias="taskId")
    status: str
    poll_interval_ms: int | None = Field(alias="pollIntervalMs", default=None)


class TasksClient(ClientExtension):
    """The client side of the tasks extension: polls a task until it ends."""

    identifier = TASKS

    def __init__(self) -> None:
        self.last_task: str | None = None
        self.polls = 0

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=CreateTaskResult, resolve=self._resolve)]

    async def _resolve(self, handle: CreateTaskResult, ctx: ClaimContext) -> types.CallToolResult:
        self.last_task = handle.task_id
        self.polls = 0
        interval = (handle.poll_interval_ms or 50) / 1000
        for _ in range(200):
            self.polls += 1
            task = await ctx.session.send_request(
                GetTaskRequest(params=TaskIdParams(task_id=handle.task_id)), _ANY
            )
            status = task.get("status")
            if status == "completed":
                return types.CallToolResult.model_validate(task.get("result") or {})
            if status in ("failed", "cancelled"):
                error = task.get("error") or {}
                raise MCPError(code=error.get("code", -32603), message=f"task {status}: {error.get('message', '')}")
            await asyncio.sleep(interval)
        raise MCPError(code=-32603, message=f"task {handle.task_id} did not end")


@contextlib.contextmanager
def ambient_trace(traceparent: str | None) -> Iterator[None]:
    """Makes `traceparent` the current OpenTelemetry span context (remote, sampled)."""
    if not traceparent:
        yield
        return
    _, trace_id, span_id, flags = traceparent.split("-")[:4]
    span = SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
    )
    token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(span)))
    try:
        yield
    finally:
        otel_context.detach(token)


def failure(op: str, error: BaseException) -> dict[str, Any]:
    if isinstance(error, MCPError):
        return {"op": op, "ok": False, "code": error.error.code, "message": error.error.message}
    if isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        return failure(op, error.exceptions[0])
    return {"op": op, "ok": False, "code": None, "message": f"{type(error).__name__}: {error}"}


def text_of(result: types.CallToolResult) -> str:
    return "".join(getattr(block, "text", "") for block in result.content)


async def run_step(client: Client, tasks: TasksClient | None, step: dict[str, Any], answers: list[Any]) -> dict[str, Any]:
    op = step.get("op")
    if op == "list_tools":
        listed = await client.list_tools(cache_mode="bypass")
        return {
            "op": op,
            "ok": True,
            "tools": [tool.name for tool in listed.tools],
            "ttlMs": listed.ttl_ms,
            "cacheScope": listed.cache_scope,
        }
    if op == "call":
        answers[:] = [step.get("answer"), 0]
        if tasks is not None:
            tasks.last_task, tasks.polls = None, 0
        result = await client.call_tool(step["tool"], step.get("arguments") or {})
        outcome: dict[str, Any] = {
            "op": op,
            "ok": True,
            "isError": bool(result.is_error),
            "text": text_of(result),
            "inputRounds": answers[1],
        }
        if tasks is not None and tasks.last_task is not None:
            outcome |= {"taskId": tasks.last_task, "taskPolls": tasks.polls}
        return outcome
    if op in ("task_get", "task_cancel", "task_update"):
        task_id = step["taskId"]
        if task_id == "@last":
            task_id = tasks.last_task if tasks is not None else None
            if task_id is None:
                return {"op": op, "ok": False, "code": None, "message": "no task was created"}
        if op == "task_update":
            request: Any = UpdateTaskRequest(
                params=TaskUpdateParams(task_id=task_id, input_responses=step.get("inputResponses") or {})
            )
        elif op == "task_get":
            request = GetTaskRequest(params=TaskIdParams(task_id=task_id))
        else:
            request = CancelTaskRequest(params=TaskIdParams(task_id=task_id))
        result = await client.session.send_request(request, _ANY)
        return {"op": op, "ok": True, "taskId": task_id, "result": result}
    return {"op": op, "ok": False, "code": None, "message": f"unknown op {op!r}"}


async def main(args: argparse.Namespace, steps: list[dict[str, Any]]) -> None:
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    # [answer for the current call, elicitations answered]
    answers: list[Any] = [None, 0]

    async def elicit(ctx: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        answers[1] += 1
        answer = answers[0]
        if answer is None:
            return types.ElicitResult(action="decline")
        return types.ElicitResult.model_validate(answer)

    tasks = TasksClient() if args.tasks else None
    http = create_mcp_http_client(headers=headers or None)
    client = Client(
        streamable_http_client(args.url, http_client=http),
        mode=args.mode,
        elicitation_callback=elicit,
        extensions=[tasks] if tasks is not None else None,
        cache=None,
        read_timeout_seconds=30,
    )
    emit = lambda line: print(json.dumps(line), flush=True)  # noqa: E731
    async with http:
        try:
            await client.__aenter__()
        except BaseException as e:  # noqa: BLE001 - reported, then stop
            emit(failure("connect", e))
            return
        try:
            emit({"op": "connect", "ok": True, "protocolVersion": client.protocol_version})
            for step in steps:
                with ambient_trace(step.get("traceparent")):
                    try:
                        emit(await run_step(client, tasks, step, answers))
                    except Exception as e:  # noqa: BLE001 - each step reports its own failure
                        failed = failure(str(step.get("op")), e)
                        if step.get("op") == "call":
                            failed["inputRounds"] = answers[1]
                        emit(failed)
        finally:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode")
    parser.add_argument("url")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--tasks", action="store_true")
    parser.add_argument("steps", nargs="?")
    arguments = parser.parse_intermixed_args()
    script = json.loads(arguments.steps if arguments.steps is not None else sys.stdin.read())
    asyncio.run(main(arguments, script))
