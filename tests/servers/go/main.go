// An MCP tool server on mcp-go (github.com/mark3labs/mcp-go), for Chaperone's
// adversarial tests: Streamable HTTP on 127.0.0.1:$PORT (or the first
// argument) at /mcp, stateful (session ids), host checks off.
//
// The tools (echo {text}, delete_user {id}, transfer {to, amount},
// get_order {id}) bind their arguments with mcp-go's typed handlers
// (mcp.NewTypedToolHandler, i.e. request.BindArguments into a Go struct:
// encoding/json, case-insensitive field names, last duplicate wins).
//
// Every executed tool call appends one JSON line to $MCP_EXEC_LOG:
//
//	{"tool", "arguments": the bound struct, "arguments_text": each bound
//	 value as Go holds it (floats by strconv 'g' -1), "raw_arguments": the
//	 arguments' JSON bytes as mcp-go kept them (json.RawMessage),
//	 "raw_arguments_text": the same bytes as a string, "sdk", "transport"}
//
// With MCP_EXIT_ON_STDIN_EOF=1 the server exits when its stdin closes.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime/debug"
	"strconv"
	"sync"

	"github.com/mark3labs/mcp-go/mcp"
	"github.com/mark3labs/mcp-go/server"
)

type echoArgs struct {
	Text string `json:"text"`
}

type idArgs struct {
	ID string `json:"id"`
}

type transferArgs struct {
	To     string  `json:"to"`
	Amount float64 `json:"amount"`
}

var (
	sdk     = "mcp-go@" + sdkVersion()
	logMu   sync.Mutex
	execLog = os.Getenv("MCP_EXEC_LOG")
)

func sdkVersion() string {
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, dep := range info.Deps {
			if dep.Path == "github.com/mark3labs/mcp-go" {
				return dep.Version
			}
		}
	}
	return "unknown"
}

// record appends the executed call to the exec log, written through at once.
func record(request mcp.CallToolRequest, bound any, text map[string]string) {
	if execLog == "" {
		return
	}
	line := map[string]any{
		"tool":               request.Params.Name,
		"arguments":          bound,
		"arguments_text":     text,
		"raw_arguments":      nil,
		"raw_arguments_text": nil,
		"sdk":                sdk,
		"transport":          "streamable-http",
	}
	if raw := request.Params.RawArguments; len(raw) > 0 {
		line["raw_arguments_text"] = string(raw)
		if json.Valid(raw) {
			line["raw_arguments"] = raw
		}
	}
	data, err := json.Marshal(line)
	if err != nil {
		fmt.Fprintln(os.Stderr, "exec log:", err)
		return
	}
	logMu.Lock()
	defer logMu.Unlock()
	f, err := os.OpenFile(execLog, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		fmt.Fprintln(os.Stderr, "exec log:", err)
		return
	}
	defer f.Close()
	if _, err := f.Write(append(data, '\n')); err != nil {
		fmt.Fprintln(os.Stderr, "exec log:", err)
	}
}

func float(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

func main() {
	port := os.Getenv("PORT")
	if len(os.Args) > 1 {
		port = os.Args[1]
	}
	if port == "" {
		port = "8080"
	}
	s := server.NewMCPServer("chaperone-test-mcp-go", sdkVersion(), server.WithToolCapabilities(false))

	s.AddTool(mcp.NewTool("echo", mcp.WithDescription("Returns the text."),
		mcp.WithString("text", mcp.Required())),
		mcp.NewTypedToolHandler(func(_ context.Context, r mcp.CallToolRequest, a echoArgs) (*mcp.CallToolResult, error) {
			record(r, a, map[string]string{"text": a.Text})
			return mcp.NewToolResultText(a.Text), nil
		}))
	s.AddTool(mcp.NewTool("delete_user", mcp.WithDescription("Deletes a user."),
		mcp.WithString("id", mcp.Required())),
		mcp.NewTypedToolHandler(func(_ context.Context, r mcp.CallToolRequest, a idArgs) (*mcp.CallToolResult, error) {
			record(r, a, map[string]string{"id": a.ID})
			return mcp.NewToolResultText("deleted"), nil
		}))
	s.AddTool(mcp.NewTool("transfer", mcp.WithDescription("Transfers an amount."),
		mcp.WithString("to", mcp.Required()), mcp.WithNumber("amount", mcp.Required())),
		mcp.NewTypedToolHandler(func(_ context.Context, r mcp.CallToolRequest, a transferArgs) (*mcp.CallToolResult, error) {
			record(r, a, map[string]string{"to": a.To, "amount": float(a.Amount)})
			return mcp.NewToolResultText("transferred"), nil
		}))
	s.AddTool(mcp.NewTool("get_order", mcp.WithDescription("Looks an order up."),
		mcp.WithString("id", mcp.Required())),
		mcp.NewTypedToolHandler(func(_ context.Context, r mcp.CallToolRequest, a idArgs) (*mcp.CallToolResult, error) {
			record(r, a, map[string]string{"id": a.ID})
			return mcp.NewToolResultText("order " + a.ID), nil
		}))

	handler := server.NewStreamableHTTPServer(s,
		server.WithEndpointPath("/mcp"),
		server.WithDisableLocalhostProtection(true),
	)
	listener, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", port))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot listen on 127.0.0.1:%s: %v\n", port, err)
		os.Exit(1)
	}
	if os.Getenv("MCP_EXIT_ON_STDIN_EOF") == "1" {
		go func() {
			_, _ = io.Copy(io.Discard, os.Stdin)
			os.Exit(0)
		}()
	}
	fmt.Printf("ready %s http://127.0.0.1:%s/mcp\n", sdk, port)
	mux := http.NewServeMux()
	mux.Handle("/mcp", handler)
	if err := http.Serve(listener, mux); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
