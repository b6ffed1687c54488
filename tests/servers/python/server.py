"""An MCP tool server on the official Python SDK (`mcp` on PyPI: MCPServer,
formerly FastMCP), for Chaperone's adversarial tests.

Streamable HTTP on 127.0.0.1:$PORT (or the first argument) at /mcp, stateful
(session ids), DNS-rebinding host checks off. With MCP_STATELESS=1 the SDK's
stateless mode instead (no session ids; handshake-era requests served one by
one); with MCP_JSON_RESPONSE=1 answers are JSON rather than SSE streams.
Either way the SDK serves MCP 2026-07-28 (per-request `_meta`,
`server/discover`) on the same endpoint, decided per request.

The tools (echo {text}, delete_user {id}, transfer {to, amount}, get_order
{id}) take typed parameters: the SDK validates and converts the arguments
with pydantic before the function runs. Two more exercise 2026-07-28:
  close_account {id}: asks the user to confirm (an elicitation, resolved by
    the SDK: an `input_required` result on 2026-07-28) and runs once the
    retried call carries the answer.
  schedule_transfer {to, amount}: runs as a task (the
    `io.modelcontextprotocol/tasks` extension: `resultType: "task"`, then
    tasks/get, tasks/update, tasks/cancel) when the request declares the
    extension in its client capabilities, else like any tool. The SDK has
    the extension points (`Extension`: a tools/call interceptor and new
    methods), not the extension; it is written here on them. The tool runs
    when the task is created; tasks/get then reports it completed.
tools/list results carry the cache hints ttlMs 60000, cacheScope "public"
(2026-07-28), so a proxy that filters the list can be seen to rewrite them.

Every executed tool call appends one JSON line to $MCP_EXEC_LOG:
  {"tool", "arguments": the parameters the function got, "arguments_text":
   each as Python holds it (repr() for floats), "raw_arguments": the call's
   params.arguments as the SDK parsed them, "sdk", "transport"}
Non-finite floats (which Python's json module reads from NaN/Infinity) are
written as null, with their repr in arguments_text.
With MCP_EXIT_ON_STDIN_EOF=1 the server exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import threading
import uuid
from datetime import datetime, timezone
from importlib.metadata import version
from typing import Annotated, Any

import uvicorn
from mcp.server.caching import CacheHint
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.resolve import Elicit, Resolve
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, CallToolRequestParams, RequestParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, Field

SDK_VERSION = version("mcp")
SDK = f"python@{SDK_VERSION}"
EXEC_LOG = os.environ.get("MCP_EXEC_LOG")
_log_lock = threading.Lock()


def _finite(value: Any) -> Any:
    """`value` with non-finite floats as None, so the line is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


def record(tool: str, arguments: dict[str, Any], ctx: Context) -> None:
    if not EXEC_LOG:
        return
    params = getattr(ctx, "_input_params", None)
    raw = getattr(params, "arguments", None)
    line = {
        "tool": tool,
        "arguments": _finite(arguments),
        "arguments_text": {k: _text(v) for k, v in arguments.items()},
        "raw_arguments": _finite(raw),
        "sdk": SDK,
        "transport": "streamable-http",
    }
    data = json.dumps(line, allow_nan=False) + "\n"
    with _log_lock, open(EXEC_LOG, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()


TASKS = "io.modelcontextprotocol/tasks"
TASK_TOOLS = frozenset({"schedule_transfer"})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TaskParams(RequestParams):
    """`params` of tasks/get and tasks/cancel."""

    model_config = ConfigDict(populate_by_name=True, extra="allow")
    task_id: str = Field(alias="taskId")


class TaskUpdateParams(TaskParams):
    """`params` of tasks/update."""

    input_responses: dict[str, Any] = Field(alias="inputResponses", default_factory=dict)


class TasksExtension(Extension):
    """The `io.modelcontextprotocol/tasks` extension (SEP-2663), in memory.

    A call of a tool in TASK_TOOLS whose request declares the extension runs
    at once; its answer is a task handle (`resultType: "task"`, status
    `working`) and tasks/get reports the finished task. Unknown task ids are
    an INVALID_PARAMS error, as the extension specifies.
    """

    identifier = TASKS

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}

    def methods(self) -> list[MethodBinding]:
        modern = frozenset(MODERN_PROTOCOL_VERSIONS)
        return [
            MethodBinding("tasks/get", TaskParams, self._get, modern),
            MethodBinding("tasks/update", TaskUpdateParams, self._update, modern),
            MethodBinding("tasks/cancel", TaskParams, self._cancel, modern),
        ]

    def _task(self, task_id: str) -> dict[str, Any]:
        task = self.tasks.get(task_id)
        if task is None:
            raise MCPError(code=INVALID_PARAMS, message=f"unknown task {task_id!r}")
        return task

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        task = self._task(params.task_id)
        return {k: v for k, v in task.items() if k != "resultType"} | {"resultType": "complete"}

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: TaskUpdateParams) -> HandlerResult:
        self._task(params.task_id)
        return {"resultType": "complete"}

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> HandlerResult:
        task = self._task(params.task_id)
        if task["status"] not in ("completed", "failed", "cancelled"):
            task.update(status="cancelled", lastUpdatedAt=_now())
        return {"resultType": "complete"}

    async def intercept_tool_call(
        self, params: CallToolRequestParams, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        capabilities = ctx.session.client_capabilities
        declared = capabilities.extensions if capabilities else None
        if (
            params.name not in TASK_TOOLS
            or ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS
            or not declared
            or TASKS not in declared
        ):
            return await call_next(ctx)
        task_id = uuid.uuid4().hex
        created = _now()
        handle = {
            "taskId": task_id,
            "status": "working",
            "createdAt": created,
            "lastUpdatedAt": created,
            "ttlMs": 600_000,
            "pollIntervalMs": 50,
        }
        result = await call_next(ctx)
        dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True) if isinstance(result, BaseModel) else result
        self.tasks[task_id] = handle | {"status": "completed", "lastUpdatedAt": _now(), "result": dumped}
        return handle | {"resultType": "task"}


server = MCPServer(
    "chaperone-test-python",
    version=SDK_VERSION,
    log_level="WARNING",
    extensions=[TasksExtension()],
    cache_hints={"tools/list": CacheHint(ttl_ms=60_000, scope="public")},
)


@server.tool(description="Returns the text.")
def echo(text: str, ctx: Context) -> str:
    record("echo", {"text": text}, ctx)
    return text


@server.tool(description="Deletes a user.")
def delete_user(id: str, ctx: Context) -> str:  # noqa: A002 - the tool's parameter is called id
    record("delete_user", {"id": id}, ctx)
    return "deleted"


@server.tool(description="Transfers an amount.")
def transfer(to: str, amount: float, ctx: Context) -> str:
    record("transfer", {"to": to, "amount": amount}, ctx)
    return "transferred"


@server.tool(description="Looks an order up.")
def get_order(id: str, ctx: Context) -> str:  # noqa: A002
    record("get_order", {"id": id}, ctx)
    return f"order {id}"


class Confirmation(BaseModel):
    confirm: bool


def ask_to_close(id: str) -> Elicit[Confirmation]:  # noqa: A002
    return Elicit(f"Close account {id}?", Confirmation)


@server.tool(description="Closes an account once the user confirms.")
def close_account(
    id: str,  # noqa: A002
    confirmation: Annotated[Confirmation, Resolve(ask_to_close)],
    ctx: Context,
) -> str:
    record("close_account", {"id": id, "confirm": confirmation.confirm}, ctx)
    return "closed" if confirmation.confirm else "kept"


@server.tool(description="Schedules a transfer (as a task when the client supports tasks).")
def schedule_transfer(to: str, amount: float, ctx: Context) -> str:
    record("schedule_transfer", {"to": to, "amount": amount}, ctx)
    return f"scheduled {amount!r} to {to}"


def _exit_on_stdin_eof() -> None:
    while sys.stdin.buffer.read(65536):
        pass
    os._exit(0)


async def main(port: int) -> None:
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        stateless_http=os.environ.get("MCP_STATELESS") == "1",
        json_response=os.environ.get("MCP_JSON_RESPONSE") == "1",
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    http = uvicorn.Server(config)

    async def announce() -> None:
        while not http.started:
            if http.should_exit:
                return
            await asyncio.sleep(0.01)
        print(f"ready {SDK} http://127.0.0.1:{port}/mcp", flush=True)

    asyncio.get_running_loop().create_task(announce())
    await http.serve()


if __name__ == "__main__":
    if os.environ.get("MCP_EXIT_ON_STDIN_EOF") == "1":
        threading.Thread(target=_exit_on_stdin_eof, daemon=True).start()
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PORT", "8080"))
    code = 0
    try:
        asyncio.run(main(port))
    except SystemExit as exit:  # uvicorn exits when it cannot bind
        code = exit.code if isinstance(exit.code, int) else 1
        if code:
            print(f"cannot listen on 127.0.0.1:{port}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal interpreter shutdown: the stdin watcher thread would abort it.
    os._exit(code)
