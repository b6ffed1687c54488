// An MCP tool server on the official TypeScript SDK (@modelcontextprotocol/sdk),
// for Chaperone's adversarial tests. The same file runs against each SDK
// version that `make tools` installs next to it (sdk-1.17/, sdk-latest/).
//
// Serves, on 127.0.0.1:$PORT (or the first argument):
//   /mcp                      Streamable HTTP (StreamableHTTPServerTransport, stateful)
//   GET /sse, POST /messages  the legacy HTTP+SSE transport (SSEServerTransport)
// The tools: echo {text}, delete_user {id}, transfer {to, amount}, get_order {id}.
//
// Every executed tool call appends one JSON line to $MCP_EXEC_LOG:
//   {"tool", "arguments": what the handler got (after the SDK's zod binding),
//    "raw_arguments": params.arguments as the SDK's transport delivered them,
//    "arguments_text": each bound value as JS holds it (String(n) for numbers),
//    "sdk", "transport"}
// The request bodies are never parsed here: the SDK's transports read them
// themselves (1.17 honours the Content-Type charset; that is the point).
// With MCP_EXIT_ON_STDIN_EOF=1 the server exits when its stdin closes, so a
// test harness that dies never leaves it running.

import { randomUUID } from "node:crypto";
import { appendFileSync, readFileSync } from "node:fs";
import { createServer } from "node:http";

import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { SSEServerTransport } from "@modelcontextprotocol/sdk/server/sse.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { z } from "zod";

// The SDK's own package.json (installed next to this file), not its export map.
const SDK_VERSION = JSON.parse(
  readFileSync(new URL("./node_modules/@modelcontextprotocol/sdk/package.json", import.meta.url), "utf8"),
).version;
const SDK = `typescript@${SDK_VERSION}`;
const PORT = Number(process.argv[2] ?? process.env.PORT ?? 8080);
const EXEC_LOG = process.env.MCP_EXEC_LOG;

function text(value) {
  return typeof value === "string" ? value : String(value);
}

function record(tool, args, raw, transport) {
  const line = {
    tool,
    arguments: args,
    raw_arguments: raw ?? null,
    arguments_text: Object.fromEntries(Object.entries(args).map(([k, v]) => [k, text(v)])),
    sdk: SDK,
    transport,
  };
  if (EXEC_LOG) appendFileSync(EXEC_LOG, JSON.stringify(line) + "\n");
}

// params.arguments of each tools/call as the transport handed it to the
// server, by "<session>\u0000<request id>".
const rawArguments = new Map();
const rawKey = (session, id) => `${session ?? ""}\u0000${JSON.stringify(id)}`;

function newServer(transportName) {
  const server = new McpServer({ name: "chaperone-test-ts", version: SDK_VERSION });
  const tool = (name, description, inputSchema, result) =>
    server.registerTool(name, { description, inputSchema }, async (args, extra) => {
      const key = rawKey(extra.sessionId, extra.requestId);
      const raw = rawArguments.get(key);
      rawArguments.delete(key);
      record(name, args, raw, transportName);
      return { content: [{ type: "text", text: result(args) }] };
    });
  tool("echo", "Returns the text.", { text: z.string() }, (a) => a.text);
  tool("delete_user", "Deletes a user.", { id: z.string() }, () => "deleted");
  tool("transfer", "Transfers an amount.", { to: z.string(), amount: z.number() }, () => "transferred");
  tool("get_order", "Looks an order up.", { id: z.string() }, (a) => `order ${a.id}`);
  return server;
}

// Connects a fresh McpServer to `transport` and notes each tools/call's raw
// arguments on their way in.
async function connect(transport, transportName) {
  await newServer(transportName).connect(transport);
  const inner = transport.onmessage;
  transport.onmessage = (message, extra) => {
    if (message && message.method === "tools/call" && "id" in message) {
      rawArguments.set(rawKey(transport.sessionId, message.id), message.params?.arguments);
    }
    return inner.call(transport, message, extra);
  };
}

const streamable = new Map(); // session id -> StreamableHTTPServerTransport
const sse = new Map(); // session id -> SSEServerTransport

function jsonError(res, status, message) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify({ jsonrpc: "2.0", error: { code: -32000, message }, id: null }));
}

async function handle(req, res) {
  const url = new URL(req.url ?? "/", "http://127.0.0.1");
  if (url.pathname === "/mcp") {
    const session = req.headers["mcp-session-id"];
    if (session !== undefined) {
      const transport = streamable.get(session);
      if (!transport) return jsonError(res, 404, "Session not found");
      return transport.handleRequest(req, res);
    }
    // No session yet: a fresh transport; the SDK decides whether the body is
    // an initialize request (and answers 400 when it is not).
    const transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: () => randomUUID(),
      onsessioninitialized: (id) => streamable.set(id, transport),
    });
    transport.onclose = () => {
      if (transport.sessionId) streamable.delete(transport.sessionId);
    };
    await connect(transport, "streamable-http");
    return transport.handleRequest(req, res);
  }
  if (url.pathname === "/sse" && req.method === "GET") {
    const transport = new SSEServerTransport("/messages", res);
    sse.set(transport.sessionId, transport);
    res.on("close", () => sse.delete(transport.sessionId));
    await connect(transport, "sse");
    return;
  }
  if (url.pathname === "/messages" && req.method === "POST") {
    const transport = sse.get(url.searchParams.get("sessionId") ?? "");
    if (!transport) return jsonError(res, 404, "Session not found");
    return transport.handlePostMessage(req, res);
  }
  res.writeHead(404, { "content-type": "text/plain" });
  res.end("not found\n");
}

const http = createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error("request failed:", err);
    if (!res.headersSent) jsonError(res, 500, String(err));
    else res.end();
  });
});
http.on("error", (err) => {
  console.error(`cannot listen on 127.0.0.1:${PORT}: ${err.message}`);
  process.exit(1);
});
http.listen(PORT, "127.0.0.1", () => {
  console.log(`ready ${SDK} http://127.0.0.1:${PORT}/mcp http://127.0.0.1:${PORT}/sse`);
});

if (process.env.MCP_EXIT_ON_STDIN_EOF === "1") {
  process.stdin.on("end", () => process.exit(0));
  process.stdin.on("error", () => process.exit(0));
  process.stdin.resume();
}
process.on("SIGTERM", () => process.exit(0));
process.on("SIGINT", () => process.exit(0));
