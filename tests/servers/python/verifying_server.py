"""An MCP tool server on the official Python SDK (`mcp` on PyPI: MCPServer)
that verifies Chaperone's identity assertions with nothing Chaperone-specific:
PyJWT for the EdDSA signature and `rfc8785` for the argument digest.

Streamable HTTP on 127.0.0.1:$PORT (or the first argument) at /mcp, stateful
(session ids), DNS-rebinding host checks off. One tool, record {payload:
object}. For each call it:
  - reads the `Chaperone-Assertion` request header (the sidecar's JWT; several
    joined with ", " for a batch: the one for this call is used);
  - fetches the JWKS from $CHAPERONE_JWKS_URL (the controller's
    /.well-known/jwks.json) with urllib, again when it meets an unknown `kid`;
  - verifies it with PyJWT: EdDSA only, `aud` = $CHAPERONE_AUDIENCE, not
    expired, `iss` the agent the key belongs to (its JWK's
    `chaperone.dev/agent` member), `tool` this tool, `jti` not accepted
    before (until it expires);
  - recomputes `args`: "sha256:" + hex SHA-256 of rfc8785.dumps(the call's
    arguments as the tool got them), as `argsAlg` "sha256-rfc8785" says
    (integers beyond ±(2^53 - 1), which `rfc8785` refuses, as doubles).

Every call appends one JSON line to $MCP_EXEC_LOG:
  {"tool", "verified", "error", "claims", "digest_matches", "recomputed",
   "arguments", "sdk"}
and a call that does not verify, or whose digest does not match, is answered
with a tool error. Prints `ready …` on stdout once it listens; with
MCP_EXIT_ON_STDIN_EOF=1 it exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
import urllib.request
from importlib.metadata import version
from typing import Any

import jwt
import rfc8785
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings

SDK_VERSION = version("mcp")
SDK = f"python@{SDK_VERSION}"
EXEC_LOG = os.environ.get("MCP_EXEC_LOG")
JWKS_URL = os.environ.get("CHAPERONE_JWKS_URL", "")
AUDIENCE = os.environ.get("CHAPERONE_AUDIENCE", "")
HEADER = "chaperone-assertion"
AGENT_MEMBER = "chaperone.dev/agent"
AGENT_PREFIX = "chaperone:agent:"
ARGS_ALG = "sha256-rfc8785"
_log_lock = threading.Lock()


class Keys:
    """The JWKS by `kid`, fetched again when an unknown `kid` shows up."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.by_kid: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def _fetch(self) -> None:
        with urllib.request.urlopen(self.url, timeout=5) as answer:
            document = json.load(answer)
        self.by_kid = {k["kid"]: k for k in document.get("keys", []) if "kid" in k}

    def get(self, kid: str) -> dict[str, Any]:
        with self.lock:
            if kid not in self.by_kid:
                self._fetch()
            if kid not in self.by_kid:
                raise jwt.InvalidTokenError(f"no key {kid!r} in the JWKS")
            return self.by_kid[kid]


KEYS = Keys(JWKS_URL)


class Replays:
    """The `jti`s of accepted assertions, until they expire."""

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def check(self, jti: str) -> None:
        with self.lock:
            now = time.time()
            self.seen = {j: exp for j, exp in self.seen.items() if exp + 5 >= now}
            if jti in self.seen:
                raise jwt.InvalidTokenError(f"jti {jti!r} was already used (replay)")

    def record(self, jti: str, exp: float) -> None:
        with self.lock:
            self.seen[jti] = exp


REPLAYS = Replays()


def as_doubles(value: Any) -> Any:
    """`value` with integers beyond ±(2^53 - 1) as the doubles they denote.

    RFC 8785 reads every number as an IEEE double; `rfc8785` refuses such
    integers instead of rounding them (the sidecar admits up to 2^53).
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53 - 1:
        return float(value)
    if isinstance(value, dict):
        return {k: as_doubles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_doubles(v) for v in value]
    return value


def args_digest(arguments: dict[str, Any]) -> str:
    """What `args` must say for `arguments` (argsAlg sha256-rfc8785)."""
    return "sha256:" + hashlib.sha256(rfc8785.dumps(as_doubles(arguments))).hexdigest()


def verify(token: str, tool: str) -> dict[str, Any]:
    """The claims of `token` once verified, else raises jwt.InvalidTokenError."""
    header = jwt.get_unverified_header(token)
    if header.get("alg") != "EdDSA":
        raise jwt.InvalidAlgorithmError(f"alg {header.get('alg')!r} is not EdDSA")
    jwk = KEYS.get(str(header.get("kid")))
    key = jwt.PyJWK(jwk, algorithm="EdDSA")
    claims = jwt.decode(
        token,
        key,
        algorithms=["EdDSA"],
        audience=AUDIENCE,
        leeway=5,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "tool", "args"]},
    )
    # Any live sidecar's key verifies; the key must be the issuing agent's.
    if claims["iss"] != AGENT_PREFIX + str(jwk.get(AGENT_MEMBER)):
        raise jwt.InvalidIssuerError(f"iss {claims['iss']!r} is not the key's agent")
    if claims.get("argsAlg", ARGS_ALG) != ARGS_ALG:
        raise jwt.InvalidTokenError(f"argsAlg {claims['argsAlg']!r} is not {ARGS_ALG}")
    if claims["tool"] != tool:
        raise jwt.InvalidTokenError(f"the assertion is for tool {claims['tool']!r}")
    REPLAYS.check(claims["jti"])
    return claims


def check(tool: str, arguments: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Verifies the call's assertion; one exec-log line."""
    headers = ctx.headers or {}
    tokens = [t.strip() for t in (headers.get(HEADER) or "").split(",") if t.strip()]
    recomputed = args_digest(arguments)
    line: dict[str, Any] = {
        "tool": tool,
        "verified": False,
        "error": None if tokens else f"no {HEADER} header",
        "claims": None,
        "digest_matches": False,
        "recomputed": recomputed,
        "arguments": arguments,
        "sdk": SDK,
    }
    # A batch's header holds one assertion per call: take the one for this call.
    for token in tokens:
        try:
            claims = verify(token, tool)
        except (jwt.PyJWTError, OSError, ValueError, KeyError) as err:
            line["error"] = f"{type(err).__name__}: {err}"
            continue
        line.update(verified=True, error=None, claims=claims)
        line["digest_matches"] = claims["args"] == recomputed
        if line["digest_matches"]:
            REPLAYS.record(claims["jti"], claims["exp"])
            break
    if EXEC_LOG:
        data = json.dumps(line, ensure_ascii=False) + "\n"
        with _log_lock, open(EXEC_LOG, "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
    return line


server = MCPServer("chaperone-test-python-verifying", version=SDK_VERSION, log_level="WARNING")


@server.tool(description="Records the payload once the caller's Chaperone assertion verifies.")
def record(payload: dict[str, Any], ctx: Context) -> str:
    line = check("record", {"payload": payload}, ctx)
    if not line["verified"]:
        raise ValueError(f"assertion refused: {line['error']}")
    if not line["digest_matches"]:
        raise ValueError("assertion refused: its args digest is not that of these arguments")
    return "recorded"


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
