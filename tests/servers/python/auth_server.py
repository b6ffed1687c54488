"""An OAuth-protected MCP tool server on the official Python SDK (`mcp` on
PyPI: MCPServer with AuthSettings and a TokenVerifier), for Chaperone's test
of OAuth through the sidecar.

Streamable HTTP on 127.0.0.1:$PORT (or the first argument) at /mcp, stateful
(session ids), DNS-rebinding host checks off. It is an OAuth resource server
only: every MCP request needs `Authorization: Bearer $MCP_BEARER_TOKEN`
(else 401 with `WWW-Authenticate: Bearer …, resource_metadata="…"`), and the
SDK serves its RFC 9728 protected-resource metadata at
/.well-known/oauth-protected-resource/mcp (`resource`
http://127.0.0.1:$PORT/mcp, `authorization_servers` [$MCP_ISSUER_URL],
`scopes_supported` ["mcp:tools"]). The root form
/.well-known/oauth-protected-resource serves the same document, so a
client's fallback to it can be tested. No authorization server runs: the
issuer URL is only advertised.

The tools: echo {text} answers "<text> (client <client_id>)", the client id
of the token the call carried; delete_user {id}. Prints `ready <port>` on
stdout once it listens. With MCP_EXIT_ON_STDIN_EOF=1 it exits when its stdin
closes.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import sys
import threading
from importlib.metadata import version

import uvicorn
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

SDK_VERSION = version("mcp")
TOKEN = os.environ.get("MCP_BEARER_TOKEN", "")
ISSUER = os.environ.get("MCP_ISSUER_URL", "https://auth.example.test")
CLIENT_ID = "chaperone-test-client"
SCOPE = "mcp:tools"


class FixedTokenVerifier:
    """Accepts exactly one bearer token (compared in constant time)."""

    async def verify_token(self, token: str) -> AccessToken | None:
        if not TOKEN or not hmac.compare_digest(token.encode(), TOKEN.encode()):
            return None
        return AccessToken(token=token, client_id=CLIENT_ID, scopes=[SCOPE])


def build(port: int) -> MCPServer:
    resource = f"http://127.0.0.1:{port}/mcp"
    server = MCPServer(
        "chaperone-test-python-oauth",
        version=SDK_VERSION,
        log_level="WARNING",
        token_verifier=FixedTokenVerifier(),
        auth=AuthSettings(
            issuer_url=ISSUER,
            resource_server_url=resource,
            required_scopes=[SCOPE],
            # The verifier knows the one token; there is no audience to check.
            validate_token_resource=False,
        ),
    )

    @server.tool(description="Returns the text and the caller's client id.")
    def echo(text: str) -> str:
        token = get_access_token()
        return f"{text} (client {token.client_id if token else 'none'})"

    @server.tool(description="Deletes a user.")
    def delete_user(id: str) -> str:  # noqa: A002 - the tool's parameter is called id
        return "deleted"

    # The same document at the root well-known URI (RFC 9728 §3.1 without a
    # path), for clients that fall back to it.
    @server.custom_route("/.well-known/oauth-protected-resource", methods=["GET"])
    async def root_metadata(request: Request) -> Response:
        return JSONResponse(
            {
                "resource": resource,
                "authorization_servers": [ISSUER],
                "scopes_supported": [SCOPE],
                "bearer_methods_supported": ["header"],
                "resource_name": "chaperone test server (root document)",
            }
        )

    return server


def _exit_on_stdin_eof() -> None:
    while sys.stdin.buffer.read(65536):
        pass
    os._exit(0)


async def main(port: int) -> None:
    app = build(port).streamable_http_app(
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
        print(f"ready {port}", flush=True)

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
