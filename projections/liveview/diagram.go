package liveview

import (
	"bytes"
	"cmp"
	"fmt"
	"html"
	"slices"
	"strings"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/statemachine"
)

// Diagram draws the Product machine with the model's current counts.
func (m *Model) Diagram() []byte { return Diagram(events.ProductMachine, m.Counts()) }

// Layout of Diagram, in SVG user units.
const (
	boxW      = 136 // state box
	boxH      = 60
	gapX      = 128 // between neighbouring boxes: room for an arrow label
	marginX   = 44  // left of the first box: the initial pseudo-state
	rowTop    = 124 // top of the boxes: room above for loops and back arcs
	laneBase  = 64  // how far the innermost arc below the row bulges
	laneAbove = 120 // the same above the row, clear of the loops' labels
	laneStep  = 52  // each further lane
	labelLine = 15  // line height of stacked labels
)

// Diagram renders a state machine as a standalone SVG drawn from its own
// description (Definition.Edges and StateNames), with each state showing how
// many products counts puts in it.
//
// The layout is deterministic and simple: the states stand in one row,
// ordered by the longest path from the initial state (cycles broken where a
// depth-first walk from the initial state closes them), so most transitions
// point right. A transition to the next box is a straight arrow; one that
// skips boxes is an arc below the row; one that goes back is an arc above
// it; one that stays is a loop on the box. Arcs that span more boxes bulge
// further, so nested arcs do not cross. Several transitions between the same
// two states share one arrow with one label line each.
//
// Elements carry classes and data-state attributes (g.state, text.count) so
// a page that inlines the SVG can restyle it and update the counts; the
// colours are presentation attributes, which a stylesheet overrides.
func Diagram(def statemachine.Definition, counts map[string]int) []byte {
	order := stateOrder(def)
	col := make(map[string]int, len(order))
	for i, s := range order {
		col[s] = i
	}
	arrows := groupEdges(def.Edges())

	// Lanes: per side, shorter spans inside.
	var above, below []*arrow
	for _, a := range arrows {
		switch {
		case a.from == a.to || col[a.to] == col[a.from]+1:
		case col[a.to] > col[a.from]:
			below = append(below, a)
		default:
			above = append(above, a)
		}
	}
	for _, side := range [][]*arrow{above, below} {
		slices.SortStableFunc(side, func(x, y *arrow) int { return cmp.Compare(span(col, x), span(col, y)) })
		for i, a := range side {
			a.lane = i
		}
	}
	assignPorts(order, col, above, true)
	assignPorts(order, col, below, false)

	loops := map[string]bool{}
	for _, a := range arrows {
		if a.from == a.to {
			loops[a.from] = true
		}
	}
	topRoom := float64(rowTop)
	if n := len(above); n > 0 {
		topRoom = max(topRoom, 0.75*float64(laneAbove+laneStep*(n-1))+28)
	}
	bottomRoom := 24.0
	if n := len(below); n > 0 {
		bottomRoom = 0.75*float64(laneBase+laneStep*(n-1)) + 28
	}
	top := topRoom
	width := float64(marginX + len(order)*boxW + max(len(order)-1, 0)*gapX + 24)
	height := top + boxH + bottomRoom

	x := func(s string) float64 { return float64(marginX + col[s]*(boxW+gapX)) }

	var b bytes.Buffer
	title := "State machine"
	if name := humanize(def.Name); name != "" {
		title = strings.ToUpper(name[:1]) + name[1:] + " state machine"
	}
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" class="machine" viewBox="0 0 %.0f %.0f" width="%.0f" height="%.0f" role="img" aria-labelledby="machine-title machine-desc" font-family="system-ui, -apple-system, 'Segoe UI', Roboto, 'DejaVu Sans', sans-serif">`+"\n",
		width, height, width, height)
	fmt.Fprintf(&b, `<title id="machine-title">%s</title>`+"\n", esc(title))
	fmt.Fprintf(&b, `<desc id="machine-desc">%s</desc>`+"\n", esc(describe(def, order, counts)))
	b.WriteString(`<defs><marker id="machine-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">` +
		`<path d="M0,0 L10,5 L0,10 z" fill="#4a5568"/></marker></defs>` + "\n")

	// Transitions first, so boxes and labels sit on top of the lines.
	b.WriteString(`<g class="edges" fill="none" stroke="#4a5568" stroke-width="1.5">` + "\n")
	var labels bytes.Buffer
	cy := top + boxH/2
	if slices.Contains(order, def.Initial) {
		ix := x(def.Initial)
		fmt.Fprintf(&b, `<circle class="initial" cx="%.0f" cy="%.0f" r="7" fill="#4a5568" stroke="none"/>`+"\n", ix-30, cy)
		fmt.Fprintf(&b, `<path d="M%.0f,%.0f H%.0f" marker-end="url(#machine-arrow)"/>`+"\n", ix-23, cy, ix-1)
	}
	for _, a := range arrows {
		x1, x2 := x(a.from), x(a.to)
		switch {
		case a.from == a.to: // a loop on top of the box, left of the arcs' ports
			lx, rx := x1+boxW*0.28, x1+boxW*0.56
			fmt.Fprintf(&b, `<path data-from="%s" data-to="%s" d="M%.1f,%.0f C%.1f,%.0f %.1f,%.0f %.1f,%.0f" marker-end="url(#machine-arrow)"/>`+"\n",
				esc(a.from), esc(a.to), lx, top, lx-14, top-44, rx+14, top-44, rx, top)
			stackLabels(&labels, a.labels, (lx+rx)/2, top-40, -1)
		case col[a.to] == col[a.from]+1: // the next box: straight
			fmt.Fprintf(&b, `<path data-from="%s" data-to="%s" d="M%.0f,%.0f H%.0f" marker-end="url(#machine-arrow)"/>`+"\n",
				esc(a.from), esc(a.to), x1+boxW, cy, x2-1)
			stackLabels(&labels, a.labels, x1+boxW+gapX/2, cy-8, -1)
		default: // an arc above (back) or below (skipping)
			off := float64(laneAbove + laneStep*a.lane)
			y, dir := top, -1.0
			if col[a.to] > col[a.from] {
				off = float64(laneBase + laneStep*a.lane)
				y, dir = top+boxH, 1.0
			}
			sx, tx := x1+a.fromPort*boxW, x2+a.toPort*boxW
			fmt.Fprintf(&b, `<path data-from="%s" data-to="%s" d="M%.1f,%.0f C%.1f,%.0f %.1f,%.0f %.1f,%.0f" marker-end="url(#machine-arrow)"/>`+"\n",
				esc(a.from), esc(a.to), sx, y, sx, y+dir*off, tx, y+dir*off, tx, y+dir*1)
			// The apex of the curve, where the label sits on the line.
			ly := y + dir*0.75*off
			if dir < 0 {
				stackLabels(&labels, a.labels, (sx+tx)/2, ly+4, -1)
			} else {
				stackLabels(&labels, a.labels, (sx+tx)/2, ly+4, 1)
			}
		}
	}
	b.WriteString("</g>\n")
	// Labels with a white halo (paint-order), legible where a line crosses.
	b.WriteString(`<g class="labels" font-size="12" fill="#2d3748" text-anchor="middle" stroke="#fff" stroke-width="4" stroke-linejoin="round" paint-order="stroke">` + "\n")
	b.Write(labels.Bytes())
	b.WriteString("</g>\n")

	// The states.
	final := finalStates(def, arrows)
	for _, s := range order {
		n := counts[s]
		cls := "state"
		fill, stroke, sw := "#ffffff", "#4a5568", "1.5"
		if n > 0 {
			cls += " occupied"
			fill, stroke, sw = "#ebf4ff", "#2b6cb0", "2.5"
		}
		bx := x(s)
		fmt.Fprintf(&b, `<g class="%s" data-state="%s">`+"\n", cls, esc(s))
		fmt.Fprintf(&b, `<rect x="%.0f" y="%.0f" width="%d" height="%d" rx="10" fill="%s" stroke="%s" stroke-width="%s"/>`+"\n",
			bx, top, boxW, boxH, fill, stroke, sw)
		if final[s] {
			// A state with no way out gets a double border.
			fmt.Fprintf(&b, `<rect class="final" x="%.0f" y="%.0f" width="%d" height="%d" rx="7" fill="none" stroke="%s" stroke-width="1"/>`+"\n",
				bx+4, top+4, boxW-8, boxH-8, stroke)
		}
		fmt.Fprintf(&b, `<text class="name" x="%.0f" y="%.0f" text-anchor="middle" font-size="15" font-weight="600" fill="#1a202c">%s</text>`+"\n",
			bx+boxW/2, top+25, esc(humanize(s)))
		fmt.Fprintf(&b, `<text class="count" data-state="%s" x="%.0f" y="%.0f" text-anchor="middle" font-size="13" fill="#2d3748">%s</text>`+"\n",
			esc(s), bx+boxW/2, top+46, esc(CountText(n)))
		b.WriteString("</g>\n")
	}
	b.WriteString("</svg>\n")
	return b.Bytes()
}

// CountText is how a state box says how many products are in it.
func CountText(n int) string {
	if n == 1 {
		return "1 product"
	}
	return fmt.Sprintf("%d products", n)
}

// arrow is every transition between two states.
type arrow struct {
	from, to         string
	labels           []string // "event", or "event" then "[guard]", in declaration order
	lane             int
	fromPort, toPort float64 // where an arc meets its boxes, as a fraction of the width
}

func groupEdges(edges []statemachine.Edge) []*arrow {
	var out []*arrow
	byPair := map[[2]string]*arrow{}
	for _, e := range edges {
		k := [2]string{e.From, e.To}
		a := byPair[k]
		if a == nil {
			a = &arrow{from: e.From, to: e.To}
			byPair[k] = a
			out = append(out, a)
		}
		// A guard goes on a line of its own under its event: labels stay
		// narrow enough to sit between neighbouring arrows.
		a.labels = append(a.labels, humanize(e.Event))
		if e.Guard != "" {
			a.labels = append(a.labels, "["+humanize(e.Guard)+"]")
		}
	}
	return out
}

func span(col map[string]int, a *arrow) int {
	d := col[a.to] - col[a.from]
	if d < 0 {
		return -d
	}
	return d
}

// assignPorts spreads the arcs of one side (above or below the row) over
// each box's edge: arcs heading left attach on the left half, arcs heading
// right on the right half, and among them the longer ones nearer the middle,
// so that nested arcs stay nested. A box with a loop (above) keeps its
// middle free.
func assignPorts(order []string, col map[string]int, arcs []*arrow, aboveRow bool) {
	type end struct {
		a     *arrow
		from  bool
		delta int // column of the other end minus this box's
	}
	at := map[string][]end{}
	for _, a := range arcs {
		at[a.from] = append(at[a.from], end{a, true, col[a.to] - col[a.from]})
		at[a.to] = append(at[a.to], end{a, false, col[a.from] - col[a.to]})
	}
	for _, s := range order {
		ends := at[s]
		var left, right []end
		for _, e := range ends {
			if e.delta < 0 {
				left = append(left, e)
			} else {
				right = append(right, e)
			}
		}
		// Left half, left to right: nearer ones outside, farther inside.
		slices.SortStableFunc(left, func(x, y end) int { return cmp.Compare(y.delta, x.delta) })
		slices.SortStableFunc(right, func(x, y end) int { return cmp.Compare(y.delta, x.delta) })
		lo, hi := 0.08, 0.42
		if aboveRow {
			lo, hi = 0.04, 0.22 // the middle is for a loop
		}
		place := func(es []end, from, to float64) {
			for i, e := range es {
				p := from + (to-from)*float64(i+1)/float64(len(es)+1)
				if e.from {
					e.a.fromPort = p
				} else {
					e.a.toPort = p
				}
			}
		}
		place(left, lo, hi)
		place(right, 1-hi, 1-lo)
	}
}

// stackLabels writes label lines centred on x; the line nearest the arrow
// is at y and the others stack away from it (dir -1 upwards, 1 downwards).
func stackLabels(b *bytes.Buffer, lines []string, x, y float64, dir int) {
	n := len(lines)
	for i, l := range lines {
		ly := y
		if dir < 0 {
			ly = y - float64((n-1-i)*labelLine)
		} else {
			ly = y + float64(i*labelLine)
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f">%s</text>`+"\n", x, ly, esc(l))
	}
}

// stateOrder orders the states for the row: by the longest path from the
// initial state over the transitions that a depth-first walk from it does
// not find closing a cycle, then by declaration order. States the walk
// never reaches follow, in declaration order.
func stateOrder(def statemachine.Definition) []string {
	states := def.StateNames()
	index := make(map[string]int, len(states))
	for i, s := range states {
		index[s] = i
	}
	next := map[string][]string{}
	for _, e := range def.Edges() {
		if e.From != e.To && !slices.Contains(next[e.From], e.To) {
			next[e.From] = append(next[e.From], e.To)
		}
	}
	// Depth-first from the initial state, then from any state not yet
	// seen: an edge to a state on the stack closes a cycle.
	back := map[[2]string]bool{}
	const (
		unseen = iota
		onStack
		done
	)
	mark := map[string]int{}
	var walk func(s string)
	walk = func(s string) {
		mark[s] = onStack
		for _, t := range next[s] {
			switch mark[t] {
			case onStack:
				back[[2]string{s, t}] = true
			case unseen:
				walk(t)
			}
		}
		mark[s] = done
	}
	if _, ok := index[def.Initial]; ok {
		walk(def.Initial)
	}
	for _, s := range states {
		if mark[s] == unseen {
			walk(s)
		}
	}
	// Longest path over the remaining (acyclic) edges, in topological
	// order (Kahn, ties by declaration order).
	indeg := map[string]int{}
	for s, ts := range next {
		for _, t := range ts {
			if !back[[2]string{s, t}] {
				indeg[t]++
			}
		}
	}
	rank := map[string]int{}
	var queue []string
	for _, s := range states {
		if indeg[s] == 0 {
			queue = append(queue, s)
		}
	}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		for _, t := range next[s] {
			if back[[2]string{s, t}] {
				continue
			}
			rank[t] = max(rank[t], rank[s]+1)
			if indeg[t]--; indeg[t] == 0 {
				queue = append(queue, t)
				slices.SortStableFunc(queue, func(a, b string) int { return cmp.Compare(index[a], index[b]) })
			}
		}
	}
	out := slices.Clone(states)
	slices.SortStableFunc(out, func(a, b string) int {
		// The initial state always comes first.
		if (a == def.Initial) != (b == def.Initial) {
			if a == def.Initial {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(rank[a], rank[b]), cmp.Compare(index[a], index[b]))
	})
	return out
}

// finalStates are the states no transition leaves.
func finalStates(def statemachine.Definition, arrows []*arrow) map[string]bool {
	out := map[string]bool{}
	for _, s := range def.States {
		out[s] = true
	}
	for _, a := range arrows {
		if a.from != a.to {
			out[a.from] = false
		}
	}
	return out
}

// describe is the text alternative of the diagram.
func describe(def statemachine.Definition, order []string, counts map[string]int) string {
	var parts []string
	for _, s := range order {
		parts = append(parts, fmt.Sprintf("%s: %s", humanize(s), CountText(counts[s])))
	}
	var ts []string
	for _, e := range def.Edges() {
		t := fmt.Sprintf("%s from %s to %s", humanize(e.Event), humanize(e.From), humanize(e.To))
		if e.Guard != "" {
			t += " if " + humanize(e.Guard)
		}
		ts = append(ts, t)
	}
	return fmt.Sprintf("States, starting at %s: %s. Transitions: %s.",
		humanize(def.Initial), strings.Join(parts, "; "), strings.Join(ts, "; "))
}

// humanize turns an identifier into words: in_stock → in stock.
func humanize(s string) string { return strings.ReplaceAll(s, "_", " ") }

func esc(s string) string { return html.EscapeString(s) }
