// Command argocd-health runs an Argo CD resource health script as Argo CD runs one, for Eden's
// tests of the health checks in examples/argocd: in gopher-lua (the interpreter Argo CD embeds)
// with only the libraries Argo CD opens by default (package, base, table), the object decoded
// from JSON into tables as Argo CD decodes it, as the global `obj`; the script's returned table
// is the health.
//
// Usage:
//
//	argocd-health SCRIPT_FILE < OBJECT.json
//
// It prints {"status": ..., "message": ...} and fails when the script errs, runs past a
// second, or returns no table or a status Argo CD does not know.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// The statuses Argo CD accepts from a health script.
var statuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "argocd-health:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) != 2 {
		return fmt.Errorf("usage: argocd-health SCRIPT_FILE < OBJECT.json")
	}
	script, err := os.ReadFile(os.Args[1])
	if err != nil {
		return err
	}
	var object map[string]any
	if err := json.NewDecoder(os.Stdin).Decode(&object); err != nil {
		return fmt.Errorf("the object: %w", err)
	}
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		l.Push(l.NewFunction(lib.open))
		l.Push(lua.LString(lib.name))
		l.Call(1, 0)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", decode(l, object))
	if err := l.DoString(string(script)); err != nil {
		return err
	}
	returned, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return fmt.Errorf("the script returned %s, not a table", l.Get(-1).Type())
	}
	health := map[string]string{
		"status":  lua.LVAsString(returned.RawGetString("status")),
		"message": lua.LVAsString(returned.RawGetString("message")),
	}
	if !statuses[health["status"]] {
		return fmt.Errorf("the script returned status %q, which Argo CD does not know", health["status"])
	}
	return json.NewEncoder(os.Stdout).Encode(health)
}

// decode turns a JSON value into a Lua value: objects into tables keyed by name, arrays into
// tables indexed from 1.
func decode(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case float64:
		return lua.LNumber(v)
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	case []any:
		table := l.CreateTable(len(v), 0)
		for _, item := range v {
			table.Append(decode(l, item))
		}
		return table
	case map[string]any:
		table := l.CreateTable(0, len(v))
		for key, item := range v {
			table.RawSetH(lua.LString(key), decode(l, item))
		}
		return table
	}
	return lua.LNil
}
