// A JSON reader for Chaperone's property tests: how Go's standard
// encoding/json reads a request body.
//
// Reads newline-separated standard base64 of raw bodies on stdin (an empty
// line is an empty body) and prints one JSON line per body:
//
//	{"map": READING, "struct": READING}
//
// "map" decodes into map[string]any with UseNumber:
//
//	{"ok":true,"value":V,"numbers":{POINTER:TEXT}} or {"ok":false,"error":E}
//
// (numbers keep their json.Number text; duplicate keys: the last wins).
// "struct" decodes into struct{Method string; Params struct{Name string;
// Arguments map[string]any}} with json.Unmarshal (field names matched
// case-insensitively, the last matching key wins, numbers as float64):
//
//	{"ok":true,"method":M,"name":N,"arguments":A,"numbers":{POINTER:TEXT}}
//	or {"ok":false,"error":E}
//
// "numbers" maps the JSON pointer (RFC 6901) of every number in "value" (from
// the document's root) or in "arguments" (from the arguments object) to its
// text as Go holds it: the json.Number text, or strconv.FormatFloat(f, 'g',
// -1, 64). The numbers inside V and A are written with that same text, so a
// reader with exact decimals sees them too, except that a json.Number beyond
// float64's range is null there (most readers of this output could not hold
// it); its text stays in "numbers".
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strconv"
	"strings"
)

type request struct {
	Method string
	Params struct {
		Name      string
		Arguments map[string]any
	}
}

func pointerToken(key string) string {
	return strings.ReplaceAll(strings.ReplaceAll(key, "~", "~0"), "/", "~1")
}

// render writes v as JSON with numbers as Go holds them, noting each number's
// text under its pointer.
func render(buf *bytes.Buffer, v any, ptr string, numbers map[string]string) error {
	switch x := v.(type) {
	case nil:
		buf.WriteString("null")
	case bool:
		buf.WriteString(strconv.FormatBool(x))
	case json.Number:
		numbers[ptr] = string(x)
		if _, err := strconv.ParseFloat(string(x), 64); err != nil {
			buf.WriteString("null") // beyond float64: the text is in numbers only
		} else {
			buf.WriteString(string(x))
		}
	case float64:
		text := strconv.FormatFloat(x, 'g', -1, 64)
		numbers[ptr] = text
		buf.WriteString(text)
	case string:
		return encodeString(buf, x)
	case []any:
		buf.WriteByte('[')
		for i, item := range x {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := render(buf, item, ptr+"/"+strconv.Itoa(i), numbers); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		buf.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := encodeString(buf, k); err != nil {
				return err
			}
			buf.WriteByte(':')
			if err := render(buf, x[k], ptr+"/"+pointerToken(k), numbers); err != nil {
				return err
			}
		}
		buf.WriteByte('}')
	default:
		return fmt.Errorf("unexpected %T", v)
	}
	return nil
}

func encodeString(buf *bytes.Buffer, s string) error {
	enc := json.NewEncoder(buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(s); err != nil {
		return err
	}
	buf.Truncate(buf.Len() - 1) // Encode's newline
	return nil
}

func rendered(v any) (json.RawMessage, map[string]string, error) {
	var buf bytes.Buffer
	numbers := map[string]string{}
	if err := render(&buf, v, "", numbers); err != nil {
		return nil, nil, err
	}
	return buf.Bytes(), numbers, nil
}

func failed(err error) map[string]any { return map[string]any{"ok": false, "error": err.Error()} }

func readMap(body []byte) map[string]any {
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.UseNumber()
	var v map[string]any
	if err := dec.Decode(&v); err != nil {
		return failed(err)
	}
	// Like json.Unmarshal, refuse anything but white space after the value.
	if _, err := dec.Token(); err != io.EOF {
		if err == nil {
			err = fmt.Errorf("invalid data after top-level value")
		}
		return failed(err)
	}
	value, numbers, err := rendered(v)
	if err != nil {
		return failed(err)
	}
	return map[string]any{"ok": true, "value": value, "numbers": numbers}
}

func readStruct(body []byte) map[string]any {
	var r request
	if err := json.Unmarshal(body, &r); err != nil {
		return failed(err)
	}
	var args any
	if r.Params.Arguments != nil {
		args = r.Params.Arguments
	}
	arguments, numbers, err := rendered(args)
	if err != nil {
		return failed(err)
	}
	return map[string]any{
		"ok": true, "method": r.Method, "name": r.Params.Name,
		"arguments": arguments, "numbers": numbers,
	}
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 256<<20)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	enc := json.NewEncoder(out)
	enc.SetEscapeHTML(false)
	for in.Scan() {
		var line any
		body, err := base64.StdEncoding.DecodeString(strings.TrimSpace(in.Text()))
		if err != nil {
			line = map[string]any{"error": "base64: " + err.Error()}
		} else {
			line = map[string]any{"map": readMap(body), "struct": readStruct(body)}
		}
		if err := enc.Encode(line); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
