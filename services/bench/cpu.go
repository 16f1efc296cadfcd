package main

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc: 100 on every
// Linux the bench is meant for (reading sysconf would need cgo).
const clockTicks = 100

// cpuMark is a reading of the machine's and some processes' CPU time, so a
// scenario can tell what was busy while it ran: a figure that stops at
// "every CPU busy" is bounded by the machine, not by the code's waiting.
type cpuMark struct {
	at          time.Time
	busy, total uint64 // machine-wide jiffies, all CPUs
	procs       []uint64
	waits       []uint64 // ns the processes' threads were runnable but not running
	self        uint64
}

// markCPU reads the CPU times now; procs may contain nil (not running).
func markCPU(procs ...*proc) cpuMark {
	m := cpuMark{at: time.Now(), procs: make([]uint64, len(procs)), waits: make([]uint64, len(procs))}
	m.busy, m.total, _ = machineJiffies()
	for i, p := range procs {
		if p != nil {
			m.procs[i], _ = processJiffies(p.cmd.Process.Pid)
			m.waits[i] = runDelay(p.cmd.Process.Pid)
		}
	}
	m.self, _ = processJiffies(os.Getpid())
	return m
}

// cpuUse is what was busy between two marks.
type cpuUse struct {
	Machine float64   // % of all CPUs busy (user, system, irq, steal: not idle or iowait)
	Procs   []float64 // % of one CPU, per process given to markCPU
	// Waits is, per process, the time its threads were ready to run but
	// waited for a CPU, in % of the wall time (summed over threads, so it
	// can exceed 100): high when the machine, not the process, is the limit.
	Waits []float64
	Bench float64 // % of one CPU used by the bench itself (load generation)
}

// since returns the CPU use from m until now, for the same processes.
func (m cpuMark) since(procs ...*proc) cpuUse {
	now := markCPU(procs...)
	secs := now.at.Sub(m.at).Seconds()
	u := cpuUse{Procs: make([]float64, len(procs)), Waits: make([]float64, len(procs))}
	if dt := now.total - m.total; dt > 0 {
		u.Machine = 100 * float64(now.busy-m.busy) / float64(dt)
	}
	if secs <= 0 {
		return u
	}
	pct := func(a, b uint64) float64 { return 100 * float64(b-a) / clockTicks / secs }
	for i := range procs {
		if i < len(m.procs) && now.procs[i] >= m.procs[i] {
			u.Procs[i] = pct(m.procs[i], now.procs[i])
		}
		if i < len(m.waits) && now.waits[i] >= m.waits[i] {
			u.Waits[i] = 100 * float64(now.waits[i]-m.waits[i]) / 1e9 / secs
		}
	}
	u.Bench = pct(m.self, now.self)
	return u
}

// machineJiffies reads the first line of /proc/stat.
func machineJiffies() (busy, total uint64, err error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0, fmt.Errorf("cpu: %w", err)
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("cpu: unexpected /proc/stat line %q", line)
	}
	// user nice system idle iowait irq softirq steal [guest guest_nice]:
	// guest time is already counted in user, so only the first eight add up.
	for i, v := range f[1:9] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("cpu: %w", err)
		}
		total += n
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy, total, nil
}

// processJiffies is a process's user + system CPU time.
func processJiffies(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, fmt.Errorf("cpu of %d: %w", pid, err)
	}
	// The command name, in parentheses, may hold spaces: count fields from
	// after its closing parenthesis (field 3, state, comes first).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("cpu of %d: short /proc/%d/stat", pid, pid)
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("cpu of %d: bad utime/stime", pid)
	}
	return utime + stime, nil
}

// runDelay sums, over a process's threads, the nanoseconds they spent
// runnable but waiting for a CPU (/proc/<pid>/task/*/schedstat, second
// field). Threads that exited drop out; Go rarely ends its threads.
func runDelay(pid int) uint64 {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return 0
	}
	var total uint64
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) >= 2 {
			if n, err := strconv.ParseUint(f[1], 10, 64); err == nil {
				total += n
			}
		}
	}
	return total
}
