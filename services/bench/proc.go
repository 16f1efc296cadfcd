package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// binaries are the service binaries, built once per run into a temporary
// directory: the bench measures the real processes, as they run in
// production, not the services' Run functions inside its own process (which
// would share its CPU accounting, heap and RSS).
type binaries struct {
	dir   string
	paths map[string]string
}

// buildServices runs `go build` for the products and catalog services from
// the module root.
func buildServices(ctx context.Context) (binaries, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return binaries{}, err
	}
	dir, err := os.MkdirTemp("", "statemill-bench-bin-")
	if err != nil {
		return binaries{}, fmt.Errorf("build: %w", err)
	}
	b := binaries{dir: dir, paths: map[string]string{}}
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator), "./services/products", "./services/catalog")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	if err != nil {
		b.remove()
		return binaries{}, fmt.Errorf("go build: %w\n%s", err, out)
	}
	for _, name := range []string{"products", "catalog"} {
		b.paths[name] = filepath.Join(dir, name)
	}
	return b, nil
}

func (b binaries) remove() {
	if b.dir != "" {
		_ = os.RemoveAll(b.dir)
	}
}

// moduleRoot is the directory of go.mod, wherever the bench (or its test)
// runs from.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the statemill module (go env GOMOD is empty)")
	}
	return filepath.Dir(gomod), nil
}

// proc is a service binary running as a child process.
type proc struct {
	label string
	cmd   *exec.Cmd
	base  string // http://127.0.0.1:port
	done  chan struct{}

	mu       sync.Mutex
	tail     []string // its last log lines, for error messages
	exitErr  error
	stopping bool
}

func (p *proc) remember(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.tail) == 30 {
		p.tail = p.tail[1:]
	}
	p.tail = append(p.tail, line)
}

// lastLines is the tail of the process's log, for error messages.
func (p *proc) lastLines() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.tail) == 0 {
		return "(no log lines)"
	}
	return strings.Join(p.tail, "\n")
}

// start runs a service binary and waits until it serves a healthy /healthz.
//
// It learns the port (the service listens on 127.0.0.1:0) from the
// "listening" log line when the service logs it, and otherwise from the
// process's own listening socket in /proc: the bench runs the services at
// LOG_LEVEL=warn, where the (info) listening line is not written.
func (e *env) start(ctx context.Context, bin, label string, vars map[string]string) (*proc, error) {
	path, ok := e.bins.paths[bin]
	if !ok {
		return nil, fmt.Errorf("no binary %q", bin)
	}
	cmd := exec.Command(path)
	cmd.Env = os.Environ()
	for k, v := range vars {
		cmd.Env = append(cmd.Env, k+"="+v) // later entries win
	}
	setProcAttr(cmd)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	// BENCH_LOG_DIR keeps every line the services log, for a closer look
	// at a run (with BENCH_SERVICE_LOG_LEVEL=info or debug).
	var logFile io.WriteCloser
	if dir := os.Getenv("BENCH_LOG_DIR"); dir != "" {
		name := filepath.Join(dir, strings.ReplaceAll(label, "/", "-")+".log")
		if logFile, err = os.OpenFile(name, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644); err != nil {
			return nil, fmt.Errorf("start %s: %w", label, err)
		}
	}
	p := &proc{label: label, cmd: cmd, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		if logFile != nil {
			logFile.Close()
		}
		return nil, fmt.Errorf("start %s: %w", label, err)
	}
	e.mu.Lock()
	e.procs = append(e.procs, p)
	e.mu.Unlock()

	logged := make(chan string, 1)
	go func() {
		if logFile != nil {
			defer logFile.Close()
		}
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			var line struct {
				Msg  string `json:"msg"`
				Addr string `json:"addr"`
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && strings.HasSuffix(line.Msg, "listening") && line.Addr != "" {
				select {
				case logged <- line.Addr:
				default:
				}
			}
			p.remember(sc.Text())
			if logFile != nil {
				_, _ = fmt.Fprintln(logFile, sc.Text())
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	go func() {
		err := cmd.Wait()
		p.mu.Lock()
		p.exitErr = err
		unexpected := !p.stopping
		p.mu.Unlock()
		close(p.done)
		if unexpected {
			e.logf("%s exited unexpectedly (%v); last log lines:\n%s", label, err, p.lastLines())
		}
	}()

	addr, err := p.discoverAddr(ctx, logged)
	if err != nil {
		_ = p.stop()
		return nil, err
	}
	p.base = "http://" + addr
	if err := p.waitHealthy(ctx, 60*time.Second); err != nil {
		_ = p.stop()
		return nil, err
	}
	return p, nil
}

func (p *proc) discoverAddr(ctx context.Context, logged <-chan string) (string, error) {
	deadline := time.After(60 * time.Second)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case a := <-logged:
			return a, nil
		case <-p.done:
			return "", fmt.Errorf("%s exited before it listened (%v); last log lines:\n%s", p.label, p.exitError(), p.lastLines())
		case <-deadline:
			return "", fmt.Errorf("%s did not listen within 60s; last log lines:\n%s", p.label, p.lastLines())
		case <-ctx.Done():
			return "", ctx.Err()
		case <-tick.C:
			if port, err := listeningPort(p.cmd.Process.Pid); err == nil && port != 0 {
				return "127.0.0.1:" + strconv.Itoa(port), nil
			}
		}
	}
}

func (p *proc) waitHealthy(ctx context.Context, timeout time.Duration) error {
	deadline := time.After(timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	client := &http.Client{Timeout: 2 * time.Second}
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.base+"/healthz", nil)
		if err != nil {
			return fmt.Errorf("%s healthz: %w", p.label, err)
		}
		if res, err := client.Do(req); err == nil {
			_, _ = io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited before it was healthy (%v); last log lines:\n%s", p.label, p.exitError(), p.lastLines())
		case <-deadline:
			return fmt.Errorf("%s not healthy within %s; last log lines:\n%s", p.label, timeout, p.lastLines())
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func (p *proc) exitError() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitErr
}

// stop sends SIGTERM (the services stop cleanly on it: requests finish,
// the relay flushes) and waits; after 30s it kills. A non-zero exit is
// reported as an error.
func (p *proc) stop() error {
	p.mu.Lock()
	p.stopping = true
	p.mu.Unlock()
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s ignored SIGTERM for 30s and was killed", p.label)
	}
	if err := p.exitError(); err != nil {
		return fmt.Errorf("%s stopped with %w; last log lines:\n%s", p.label, err, p.lastLines())
	}
	return nil
}

// alive reports an error when the process has exited.
func (p *proc) alive() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s has exited (%v); last log lines:\n%s", p.label, p.exitError(), p.lastLines())
	default:
		return nil
	}
}

// peakRSSMiB is the process's peak resident set size (VmHWM) so far.
func (p *proc) peakRSSMiB() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return 0, fmt.Errorf("%s peak RSS: %w", p.label, err)
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			if err != nil {
				return 0, fmt.Errorf("%s peak RSS: parse %q: %w", p.label, line, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("%s peak RSS: no VmHWM in /proc/%d/status", p.label, p.cmd.Process.Pid)
}

// listeningPort finds the TCP port pid listens on: the sockets among its
// file descriptors that /proc/<pid>/net/tcp{,6} lists in state LISTEN (0A).
func listeningPort(pid int) (int, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	for _, table := range []string{"tcp", "tcp6"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, table))
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			if len(f) < 10 || f[3] != "0A" || !inodes[f[9]] {
				continue
			}
			_, hexPort, ok := strings.Cut(f[1], ":")
			if !ok {
				continue
			}
			port, err := strconv.ParseUint(hexPort, 16, 16)
			if err == nil {
				return int(port), nil
			}
		}
	}
	return 0, nil
}
