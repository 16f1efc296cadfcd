// Package statemachine is a small, generic, declarative state machine engine.
//
// A machine is data: a [Definition] lists its states, its initial state and its
// events; each event holds ordered alternative transitions, each with a set of
// source states, one target state and an optional guard named by string. The
// definition is JSON-serialisable and is also the machine's self-description:
// consumers use [Definition.Allows] to check a transition they receive, and
// [Definition.Edges] / [Definition.Mermaid] to draw it.
//
// A [Machine] binds a definition to guard functions over a subject type T and
// fires events: the first alternative whose source set contains the current
// state and whose guard (if any) accepts the subject wins. A machine is
// immutable after construction and safe for concurrent use.
package statemachine

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// Definition is a machine as data.
type Definition struct {
	Name    string      `json:"name"`
	Initial string      `json:"initial"`
	States  []string    `json:"states"`
	Events  []EventSpec `json:"events"`
}

// EventSpec is one event and its ordered alternative transitions: when the
// event fires, the first alternative that matches wins.
type EventSpec struct {
	Name        string           `json:"name"`
	Transitions []TransitionSpec `json:"transitions"`
}

// TransitionSpec is one alternative: from any state in From to To, provided the
// named Guard (if not empty) accepts the subject.
type TransitionSpec struct {
	From  []string `json:"from"`
	To    string   `json:"to"`
	Guard string   `json:"guard,omitempty"`
}

// Edge is one from→to arrow of a definition, for diagrams and documentation.
type Edge struct {
	Event string `json:"event"`
	From  string `json:"from"`
	To    string `json:"to"`
	Guard string `json:"guard,omitempty"`
}

// Validate reports every structural problem of the definition at once (joined
// with errors.Join), or nil. It checks: non-empty machine, state, event and
// guard names; at least one state; the initial state is declared; no duplicate
// states or events; every event has at least one transition; every transition
// has at least one source state, no duplicate source state, and declared
// source and target states; no alternative is unreachable because an earlier
// unguarded alternative of the same event already covers its source state.
func (d Definition) Validate() error {
	var errs []error
	add := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf(format, args...))
	}
	if strings.TrimSpace(d.Name) == "" {
		add("machine name is empty")
	}
	if len(d.States) == 0 {
		add("no states declared")
	}
	states := make(map[string]struct{}, len(d.States))
	for i, s := range d.States {
		if strings.TrimSpace(s) == "" {
			add("state %d: empty name", i)
			continue
		}
		if _, dup := states[s]; dup {
			add("state %q declared twice", s)
		}
		states[s] = struct{}{}
	}
	if d.Initial == "" {
		add("initial state is empty")
	} else if _, ok := states[d.Initial]; !ok {
		add("initial state %q is not declared", d.Initial)
	}
	events := make(map[string]struct{}, len(d.Events))
	for i, ev := range d.Events {
		name := ev.Name
		if strings.TrimSpace(name) == "" {
			add("event %d: empty name", i)
			name = fmt.Sprintf("#%d", i)
		} else if _, dup := events[name]; dup {
			add("event %q declared twice", name)
		}
		events[name] = struct{}{}
		if len(ev.Transitions) == 0 {
			add("event %q: no transitions", name)
		}
		// covered: source states already taken by an earlier unguarded alternative.
		covered := map[string]int{}
		for j, t := range ev.Transitions {
			if len(t.From) == 0 {
				add("event %q transition %d: no source state", name, j)
			}
			if t.Guard != "" && strings.TrimSpace(t.Guard) == "" {
				add("event %q transition %d: blank guard name", name, j)
			}
			seen := make(map[string]struct{}, len(t.From))
			for _, f := range t.From {
				if _, ok := states[f]; !ok {
					add("event %q transition %d: source state %q is not declared", name, j, f)
				}
				if _, dup := seen[f]; dup {
					add("event %q transition %d: source state %q listed twice", name, j, f)
				}
				seen[f] = struct{}{}
				if k, ok := covered[f]; ok {
					add("event %q transition %d: unreachable from %q, transition %d (unguarded) always wins", name, j, f, k)
				}
			}
			if _, ok := states[t.To]; !ok {
				add("event %q transition %d: target state %q is not declared", name, j, t.To)
			}
			if t.Guard == "" {
				for _, f := range t.From {
					if _, ok := covered[f]; !ok {
						covered[f] = j
					}
				}
			}
		}
	}
	return errors.Join(errs...)
}

// HasState reports whether s is a declared state.
func (d Definition) HasState(s string) bool { return slices.Contains(d.States, s) }

// HasEvent reports whether e is a declared event.
func (d Definition) HasEvent(e string) bool { return d.event(e) != nil }

// EventNames returns the declared event names in declaration order.
func (d Definition) EventNames() []string {
	names := make([]string, len(d.Events))
	for i, ev := range d.Events {
		names[i] = ev.Name
	}
	return names
}

// StateNames returns a copy of the declared states in declaration order.
func (d Definition) StateNames() []string { return slices.Clone(d.States) }

// GuardNames returns the distinct guard names the definition uses, in order of
// first appearance.
func (d Definition) GuardNames() []string {
	var names []string
	for _, ev := range d.Events {
		for _, t := range ev.Transitions {
			if t.Guard != "" && !slices.Contains(names, t.Guard) {
				names = append(names, t.Guard)
			}
		}
	}
	return names
}

// Allows reports whether the definition declares from→to for event, under any
// guard. Consumers use it to check a transition they receive.
func (d Definition) Allows(event, from, to string) bool {
	ev := d.event(event)
	if ev == nil {
		return false
	}
	for _, t := range ev.Transitions {
		if t.To == to && slices.Contains(t.From, from) {
			return true
		}
	}
	return false
}

// Targets returns the states event may lead to from the given state, in the
// order the alternatives are tried (no duplicates).
func (d Definition) Targets(event, from string) []string {
	ev := d.event(event)
	if ev == nil {
		return nil
	}
	var out []string
	for _, t := range ev.Transitions {
		if slices.Contains(t.From, from) && !slices.Contains(out, t.To) {
			out = append(out, t.To)
		}
	}
	return out
}

// Edges returns one edge per (event, from, to, guard), in declaration order.
func (d Definition) Edges() []Edge {
	var out []Edge
	for _, ev := range d.Events {
		for _, t := range ev.Transitions {
			for _, f := range t.From {
				e := Edge{Event: ev.Name, From: f, To: t.To, Guard: t.Guard}
				if !slices.Contains(out, e) {
					out = append(out, e)
				}
			}
		}
	}
	return out
}

// Mermaid renders the definition as a Mermaid stateDiagram-v2. Guarded edges
// are labelled "event [guard]"; states without outgoing edges lead to [*].
func (d Definition) Mermaid() string {
	var b strings.Builder
	b.WriteString("stateDiagram-v2\n")
	if d.Name != "" {
		fmt.Fprintf(&b, "    %%%% %s\n", d.Name)
	}
	fmt.Fprintf(&b, "    [*] --> %s\n", d.Initial)
	edges := d.Edges()
	hasOut := map[string]bool{}
	for _, e := range edges {
		hasOut[e.From] = true
		if e.Guard != "" {
			fmt.Fprintf(&b, "    %s --> %s: %s [%s]\n", e.From, e.To, e.Event, e.Guard)
		} else {
			fmt.Fprintf(&b, "    %s --> %s: %s\n", e.From, e.To, e.Event)
		}
	}
	for _, s := range d.States {
		if !hasOut[s] {
			fmt.Fprintf(&b, "    %s --> [*]\n", s)
		}
	}
	return b.String()
}

// Clone returns a deep copy of the definition.
func (d Definition) Clone() Definition {
	c := Definition{Name: d.Name, Initial: d.Initial, States: slices.Clone(d.States)}
	if d.Events != nil {
		c.Events = make([]EventSpec, len(d.Events))
		for i, ev := range d.Events {
			c.Events[i] = EventSpec{Name: ev.Name}
			if ev.Transitions != nil {
				c.Events[i].Transitions = make([]TransitionSpec, len(ev.Transitions))
				for j, t := range ev.Transitions {
					c.Events[i].Transitions[j] = TransitionSpec{From: slices.Clone(t.From), To: t.To, Guard: t.Guard}
				}
			}
		}
	}
	return c
}

func (d Definition) event(name string) *EventSpec {
	for i := range d.Events {
		if d.Events[i].Name == name {
			return &d.Events[i]
		}
	}
	return nil
}
