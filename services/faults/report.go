package main

import (
	"fmt"
	"io"
	"text/tabwriter"
)

// printTable writes one aligned line per scenario, then each failure.
func printTable(w io.Writer, rep *report) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tattempted\tacked\trejected\thistory\tpublished\tdup_published\tapplied\tdead\tlost\tdup_applied\tconverged\tseconds\tok\t")
	for _, r := range rep.Scenarios {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%t\t%.0f\t%t\t\n",
			r.Name, r.Attempted, r.Acknowledged, r.Rejected, r.HistoryRows, r.EventsPublished, r.DuplicatesPublished,
			r.EventsApplied["catalog"], r.DeadLettered, r.Lost, r.DuplicatesApplied, r.Converged, r.DurationSeconds, r.OK)
	}
	_ = tw.Flush()
	for _, r := range rep.Scenarios {
		for _, f := range r.Failures {
			fmt.Fprintf(w, "FAIL %s: %s\n", r.Name, f)
		}
	}
	verdict := "PASS"
	if !rep.OK {
		verdict = "FAIL"
	}
	fmt.Fprintf(w, "%s: %d scenarios, %s mode, %.0fs\n", verdict, len(rep.Scenarios), rep.Mode, rep.Seconds)
}
