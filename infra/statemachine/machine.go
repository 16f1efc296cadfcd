package statemachine

import (
	"errors"
	"fmt"
	"slices"
	"strings"
)

// ErrTransitionNotAllowed is matched (errors.Is) by every *TransitionError.
var ErrTransitionNotAllowed = errors.New("transition not allowed")

// Fixed reasons of a TransitionError. A guard rejection reads
// "guard <name> rejected" (or "guards <a>, <b> rejected").
const (
	ReasonUnknownEvent = "unknown event"
	ReasonUnknownState = "unknown state"
	ReasonNotAllowed   = "not allowed from state"
)

// TransitionError is returned by Machine.Fire when an event cannot fire.
type TransitionError struct {
	Machine string
	Event   string
	From    string
	Reason  string
	// Guards lists the guards that rejected the subject, in the order tried;
	// empty unless every applicable alternative was guarded and rejected.
	Guards []string
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("%s: %s: event %q from state %q: %s", e.Machine, ErrTransitionNotAllowed, e.Event, e.From, e.Reason)
}

// Is makes errors.Is(err, ErrTransitionNotAllowed) true.
func (e *TransitionError) Is(target error) bool { return target == ErrTransitionNotAllowed }

// GuardRejected reports whether the event is declared from that state but
// every applicable alternative was refused by its guard.
func (e *TransitionError) GuardRejected() bool { return len(e.Guards) > 0 }

// Guard decides whether a guarded alternative applies to the subject. It must
// be safe for concurrent use and free of side effects.
type Guard[T any] func(subject T) bool

// Transition is one fired transition.
type Transition struct {
	Event string `json:"event"`
	From  string `json:"from"`
	To    string `json:"to"`
}

// Config binds a definition to guard functions and an optional tracking hook.
type Config[T any] struct {
	Definition Definition
	// Guards holds one function per guard named in the definition, and no other.
	Guards map[string]Guard[T]
	// OnTransition, if set, is called synchronously for every fired transition
	// (never for a refused one). It must be safe for concurrent use.
	OnTransition func(Transition)
}

// Validate checks the definition and that the guards match it exactly.
func (c Config[T]) Validate() error {
	var errs []error
	if err := c.Definition.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("definition %q: %w", c.Definition.Name, err))
	}
	used := c.Definition.GuardNames()
	for _, g := range used {
		fn, ok := c.Guards[g]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("guard %q is used by the definition but not provided", g))
		case fn == nil:
			errs = append(errs, fmt.Errorf("guard %q is nil", g))
		}
	}
	var extra []string
	for g := range c.Guards {
		if !slices.Contains(used, g) {
			extra = append(extra, g)
		}
	}
	slices.Sort(extra)
	for _, g := range extra {
		errs = append(errs, fmt.Errorf("guard %q is provided but not used by the definition", g))
	}
	return errors.Join(errs...)
}

// Machine fires events of one definition. It is immutable and safe for
// concurrent use.
type Machine[T any] struct {
	def    Definition
	hook   func(Transition)
	states map[string]struct{}
	// events: event -> from -> ordered alternatives.
	events map[string]map[string][]alternative[T]
}

type alternative[T any] struct {
	to        string
	guardName string
	guard     Guard[T] // nil when unguarded
}

// NewWithConfig validates c and builds a machine; it never panics.
func NewWithConfig[T any](c Config[T]) (*Machine[T], error) {
	if err := c.Validate(); err != nil {
		return nil, fmt.Errorf("statemachine: invalid config: %w", err)
	}
	def := c.Definition.Clone()
	m := &Machine[T]{
		def:    def,
		hook:   c.OnTransition,
		states: make(map[string]struct{}, len(def.States)),
		events: make(map[string]map[string][]alternative[T], len(def.Events)),
	}
	for _, s := range def.States {
		m.states[s] = struct{}{}
	}
	for _, ev := range def.Events {
		byFrom := make(map[string][]alternative[T])
		for _, t := range ev.Transitions {
			alt := alternative[T]{to: t.To, guardName: t.Guard}
			if t.Guard != "" {
				alt.guard = c.Guards[t.Guard]
			}
			for _, f := range t.From {
				byFrom[f] = append(byFrom[f], alt)
			}
		}
		for f, alts := range byFrom {
			byFrom[f] = slices.Clip(alts)
		}
		m.events[ev.Name] = byFrom
	}
	return m, nil
}

// Name returns the machine's name.
func (m *Machine[T]) Name() string { return m.def.Name }

// Initial returns the machine's initial state.
func (m *Machine[T]) Initial() string { return m.def.Initial }

// Definition returns a deep copy of the machine's definition.
func (m *Machine[T]) Definition() Definition { return m.def.Clone() }

// Fire fires event on a subject in state from. The first alternative whose
// source states contain from and whose guard (if any) accepts subject wins;
// the tracking hook is then called with the transition. Otherwise Fire returns
// a *TransitionError and calls no hook.
func (m *Machine[T]) Fire(subject T, from, event string) (Transition, error) {
	to, ok := m.resolve(subject, from, event)
	if !ok {
		return Transition{}, m.refusal(from, event)
	}
	t := Transition{Event: event, From: from, To: to}
	if m.hook != nil {
		m.hook(t)
	}
	return t, nil
}

// Can reports whether Fire would succeed; it calls the guards but not the hook.
func (m *Machine[T]) Can(subject T, from, event string) bool {
	_, ok := m.resolve(subject, from, event)
	return ok
}

func (m *Machine[T]) resolve(subject T, from, event string) (string, bool) {
	byFrom, ok := m.events[event]
	if !ok {
		return "", false
	}
	for _, alt := range byFrom[from] {
		if alt.guard == nil || alt.guard(subject) {
			return alt.to, true
		}
	}
	return "", false
}

// refusal explains why resolve failed; it runs only on the failure path.
func (m *Machine[T]) refusal(from, event string) error {
	e := &TransitionError{Machine: m.def.Name, Event: event, From: from}
	byFrom, ok := m.events[event]
	switch {
	case !ok:
		e.Reason = ReasonUnknownEvent
	case !m.hasState(from):
		e.Reason = ReasonUnknownState
	case len(byFrom[from]) == 0:
		e.Reason = ReasonNotAllowed
	default:
		for _, alt := range byFrom[from] {
			if !slices.Contains(e.Guards, alt.guardName) {
				e.Guards = append(e.Guards, alt.guardName)
			}
		}
		if len(e.Guards) == 1 {
			e.Reason = "guard " + e.Guards[0] + " rejected"
		} else {
			e.Reason = "guards " + strings.Join(e.Guards, ", ") + " rejected"
		}
	}
	return e
}

func (m *Machine[T]) hasState(s string) bool {
	_, ok := m.states[s]
	return ok
}
