"""An MCP tool server on the official Python SDK (`mcp` on PyPI: MCPServer,
formerly FastMCP), for Chaperone's adversarial tests.

Streamable HTTP on 127.0.0.1:$PORT (or the first argument) at /mcp, stateful
(session ids), DNS-rebinding host checks off. The tools (echo {text},
delete_user {id}, transfer {to, amount}, get_order {id}) take typed
parameters: the SDK validates and converts the arguments with pydantic
before the function runs.

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
from importlib.metadata import version
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

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


server = MCPServer("chaperone-test-python", version=SDK_VERSION, log_level="WARNING")


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


def _exit_on_stdin_eof() -> None:
    while sys.stdin.buffer.read(65536):
        pass
    os._exit(0)


async def main(port: int) -> None:
    app = server.streamable_http_app(
        streamable_http_path="/mcp",
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
