// A JSON reader for Chaperone's property tests: how Node reads a request body
// (the way the MCP TypeScript SDK does: TextDecoder UTF-8, which drops a
// leading BOM and replaces invalid bytes with U+FFFD, then JSON.parse).
//
// Reads newline-separated standard base64 of raw bodies on stdin (an empty
// line is an empty body) and prints one JSON line per body:
//   {"ok":true,"value":V,"method":M,"name":N,"arguments":A,"numbers":{POINTER:TEXT}}
//   or {"ok":false,"error":E}
// V is the whole document; M = V.method, N = V.params.name, A =
// V.params.arguments (null when absent). "numbers" maps the JSON pointer
// (RFC 6901, from the document's root) of every number in V to String(n),
// the text JS holds; the numbers inside V are written with that text too.
// Note: JSON.parse keeps the last of duplicate keys and matches keys exactly.

import { readFileSync } from "node:fs";

const token = (key) => key.replaceAll("~", "~0").replaceAll("/", "~1");

// JSON text of v with numbers as String(n), noting each number's text.
function render(v, ptr, numbers) {
  if (v === null) return "null";
  if (typeof v === "number") {
    const text = String(v);
    numbers[ptr] = text;
    return Number.isFinite(v) ? text : "null";
  }
  if (typeof v === "string" || typeof v === "boolean") return JSON.stringify(v);
  if (Array.isArray(v)) return `[${v.map((item, i) => render(item, `${ptr}/${i}`, numbers)).join(",")}]`;
  const fields = Object.keys(v).map((k) => `${JSON.stringify(k)}:${render(v[k], `${ptr}/${token(k)}`, numbers)}`);
  return `{${fields.join(",")}}`;
}

function read(body) {
  let value;
  try {
    value = JSON.parse(new TextDecoder().decode(body));
  } catch (err) {
    return JSON.stringify({ ok: false, error: String(err.message ?? err) });
  }
  const numbers = {};
  const rendered = render(value, "", numbers);
  const pick = (v) => (v === undefined ? "null" : render(v, "", {}));
  const isObject = (v) => v !== null && typeof v === "object";
  const params = isObject(value) ? value.params : undefined;
  return (
    `{"ok":true,"value":${rendered}` +
    `,"method":${pick(isObject(value) ? value.method : undefined)}` +
    `,"name":${pick(isObject(params) ? params.name : undefined)}` +
    `,"arguments":${pick(isObject(params) ? params.arguments : undefined)}` +
    `,"numbers":${JSON.stringify(numbers)}}`
  );
}

const lines = readFileSync(0, "latin1").split("\n");
if (lines.at(-1) === "") lines.pop();
const out = lines.map((line) => read(Buffer.from(line.trim(), "base64")));
process.stdout.write(out.map((l) => l + "\n").join(""));
