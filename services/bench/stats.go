package main

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// figure is one measured quantity: its value in each repetition and the
// median, min and max over them. The machine is noisy, so a single run
// means little; the median of several after a warm-up is what we compare.
type figure struct {
	Name        string    `json:"-"`
	Unit        string    `json:"unit"`
	Median      float64   `json:"median"`
	Min         float64   `json:"min"`
	Max         float64   `json:"max"`
	Reps        []float64 `json:"reps"`
	Description string    `json:"description"`
}

// newFigure summarises reps (which must not be empty).
func newFigure(name, unit, description string, reps []float64) figure {
	f := figure{Name: name, Unit: unit, Description: description, Reps: reps}
	if len(reps) == 0 {
		f.Median, f.Min, f.Max = math.NaN(), math.NaN(), math.NaN()
		return f
	}
	s := slices.Clone(reps)
	slices.Sort(s)
	f.Min, f.Max = s[0], s[len(s)-1]
	if n := len(s); n%2 == 1 {
		f.Median = s[n/2]
	} else {
		f.Median = (s[n/2-1] + s[n/2]) / 2
	}
	return f
}

// percentile returns the p-th percentile (0 < p ≤ 1, nearest rank) of
// sorted, in milliseconds.
func percentile(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(math.Ceil(p*float64(len(sorted)))) - 1
	i = min(max(i, 0), len(sorted)-1)
	return float64(sorted[i]) / float64(time.Millisecond)
}

// latencies is a per-request latency record: an HDR histogram would save
// memory, but a few hundred thousand samples sorted once are cheap and exact.
type latencies []time.Duration

func (l latencies) p50p99() (p50, p99 float64) {
	s := slices.Clone(l)
	slices.Sort(s)
	return percentile(s, 0.50), percentile(s, 0.99)
}

// results is everything a run measured.
type results struct {
	Mode     string
	Started  time.Time
	Duration time.Duration
	Machine  map[string]any
	Figures  []figure
	Summary  []summaryValue
	Errors   []string // scenarios that failed
}

// summaryValue is one of the required top-level keys of the JSON.
type summaryValue struct {
	Key         string
	Value       float64
	Description string
}

func (r *results) add(f ...figure) { r.Figures = append(r.Figures, f...) }

func (r *results) figure(name string) (figure, bool) {
	for _, f := range r.Figures {
		if f.Name == name {
			return f, true
		}
	}
	return figure{}, false
}

// median is the median of the named figure, or NaN when it is missing.
func (r *results) median(name string) float64 {
	f, ok := r.figure(name)
	if !ok {
		return math.NaN()
	}
	return f.Median
}

// ratio divides two figures' medians; NaN when either is missing or the
// divisor is zero (JSON then reports null).
func ratio(a, b float64) float64 {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

// jsonNumber writes NaN and infinities as null: encoding/json refuses them,
// and a reader should see "not measured" rather than a made-up number.
type jsonNumber float64

func (n jsonNumber) MarshalJSON() ([]byte, error) {
	f := float64(n)
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return []byte("null"), nil
	}
	return strconv.AppendFloat(nil, round(f), 'f', -1, 64), nil
}

// round keeps four significant decimals of small numbers and none beyond
// the thousandth of large ones, so the JSON stays readable.
func round(f float64) float64 {
	if f == 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return f
	}
	digits := 4 - int(math.Floor(math.Log10(math.Abs(f)))) - 1
	digits = min(max(digits, 0), 6)
	p := math.Pow(10, float64(digits))
	return math.Round(f*p) / p
}

// MarshalJSON lays the results out as the issue asks: the required keys at
// the top level, then every raw figure, then the machine.
func (r *results) MarshalJSON() ([]byte, error) {
	type fig struct {
		Median      jsonNumber   `json:"median"`
		Min         jsonNumber   `json:"min"`
		Max         jsonNumber   `json:"max"`
		Unit        string       `json:"unit"`
		Reps        []jsonNumber `json:"reps"`
		Description string       `json:"description"`
	}
	var b strings.Builder
	b.WriteString("{\n")
	write := func(key string, v any) error {
		kb, _ := json.Marshal(key)
		vb, err := json.MarshalIndent(v, "  ", "  ")
		if err != nil {
			return fmt.Errorf("marshal %s: %w", key, err)
		}
		b.WriteString("  ")
		b.Write(kb)
		b.WriteString(": ")
		b.Write(vb)
		b.WriteString(",\n")
		return nil
	}
	for _, s := range r.Summary {
		if err := write(s.Key, jsonNumber(s.Value)); err != nil {
			return nil, err
		}
	}
	figs := map[string]fig{}
	for _, f := range r.Figures {
		reps := make([]jsonNumber, len(f.Reps))
		for i, v := range f.Reps {
			reps[i] = jsonNumber(v)
		}
		figs[f.Name] = fig{jsonNumber(f.Median), jsonNumber(f.Min), jsonNumber(f.Max), f.Unit, reps, f.Description}
	}
	summary := map[string]string{}
	for _, s := range r.Summary {
		summary[s.Key] = s.Description
	}
	for _, kv := range []struct {
		k string
		v any
	}{
		{"figures", figs},
		{"definitions", summary},
		{"errors", append([]string{}, r.Errors...)},
		{"mode", r.Mode},
		{"started_at", r.Started.UTC().Format(time.RFC3339)},
		{"duration_s", jsonNumber(r.Duration.Seconds())},
	} {
		if err := write(kv.k, kv.v); err != nil {
			return nil, err
		}
	}
	mb, err := json.MarshalIndent(r.Machine, "  ", "  ")
	if err != nil {
		return nil, fmt.Errorf("marshal machine: %w", err)
	}
	b.WriteString("  \"machine\": ")
	b.Write(mb)
	b.WriteString("\n}\n")
	return []byte(b.String()), nil
}

// printTable writes the figures and the summary as aligned columns.
func printTable(w io.Writer, r *results) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "figure\tmedian\tmin\tmax\tunit\treps\t\n")
	for _, f := range r.Figures {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t\n", f.Name, human(f.Median), human(f.Min), human(f.Max), f.Unit, len(f.Reps))
	}
	fmt.Fprintf(tw, "\t\t\t\t\t\t\n")
	fmt.Fprintf(tw, "summary\tvalue\t\t\t\t\t\n")
	for _, s := range r.Summary {
		fmt.Fprintf(tw, "%s\t%s\t\t\t\t\t\n", s.Key, human(s.Value))
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("print table: %w", err)
	}
	for _, e := range r.Errors {
		fmt.Fprintf(w, "\nFAILED %s\n", e)
	}
	_, err := fmt.Fprintf(w, "\nmode %s, %s, %v CPUs, %s; load average %v at the start, %v at the end; took %s\n",
		r.Mode, r.Started.UTC().Format(time.RFC3339), r.Machine["nproc"], r.Machine["go_version"],
		r.Machine["loadavg_start"], r.Machine["loadavg_end"], r.Duration.Round(time.Second))
	return err
}

// human formats a number for the table: thousands without decimals,
// small numbers with a few.
func human(f float64) string {
	switch a := math.Abs(f); {
	case math.IsNaN(f):
		return "n/a"
	case a >= 1000:
		return strconv.FormatFloat(math.Round(f), 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(f, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(f, 'f', 2, 64)
	default:
		return strconv.FormatFloat(f, 'f', 3, 64)
	}
}
