// Renders Ollama TEMPLATEs with Go's text/template, as Ollama does, for tests/test_ollama.py.
//
// Reads {"template": "...", "conversations": [[{"role": ..., "content": ...}, ...], ...]} on stdin and
// writes the rendering of each conversation as a JSON list of strings. The data passed to the template
// has the fields of Ollama's template values that edgekit's TEMPLATEs use (.Messages with .Role and
// .Content), plus the empty .System/.Prompt/.Response of older templates.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	Messages []Message
	System   string
	Prompt   string
	Response string
}

type Input struct {
	Template      string      `json:"template"`
	Conversations [][]Message `json:"conversations"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(in.Template))
	out := []string{}
	for _, conv := range in.Conversations {
		var b strings.Builder
		if err := tmpl.Execute(&b, Values{Messages: conv}); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		panic(err)
	}
}
