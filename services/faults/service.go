package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// service is a statemill binary running as a child process on a fixed
// loopback port, so that a restart keeps its address and the load clients
// simply reconnect.
type service struct {
	name string
	bin  string
	env  []string
	base string // http://127.0.0.1:<port>
	logf *os.File
	// startTimeout bounds start: until the service is healthy. Default 90s.
	startTimeout time.Duration

	// ctx bounds automatic restarts: a service that exits on its own is
	// started again (as a container's restart policy would) until ctx ends.
	ctx context.Context

	startMu sync.Mutex // one start at a time

	mu       sync.Mutex
	cmd      *exec.Cmd
	done     chan struct{}
	expected bool // the next exit was asked for (kill or stop)
	stopped  bool // stop was called: no more starts
	tail     []string
	exits    []string // unexpected exits: how and the last log lines
}

func newService(ctx context.Context, name, bin, logPath string, port int, env map[string]string) (*service, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	s := &service{name: name, bin: bin, base: fmt.Sprintf("http://127.0.0.1:%d", port), logf: f, ctx: ctx, startTimeout: 90 * time.Second}
	env["HTTP_ADDR"] = fmt.Sprintf("127.0.0.1:%d", port)
	// The suite's own environment (make exports DATABASE_URL and AMQP_URL
	// for `make run`) comes first: the last value of a key wins.
	s.env = os.Environ()
	for k, v := range env {
		s.env = append(s.env, k+"="+v)
	}
	return s, nil
}

// start launches the binary and waits until /healthz answers 200.
func (s *service) start(ctx context.Context) error {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	s.mu.Lock()
	stopped := s.stopped
	s.mu.Unlock()
	if stopped {
		return fmt.Errorf("%s: stopped", s.name)
	}
	if s.running() {
		return nil
	}
	cmd := exec.Command(s.bin)
	cmd.Env = s.env
	cmd.Stdout = s.logf
	setProcAttr(cmd)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return fmt.Errorf("%s: %w", s.name, err)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.name, err)
	}
	done := make(chan struct{})
	s.mu.Lock()
	s.cmd, s.done, s.expected = cmd, done, false
	s.mu.Unlock()
	fmt.Fprintf(s.logf, "=== %s started, pid %d, %s\n", s.name, cmd.Process.Pid, time.Now().Format(time.RFC3339Nano))
	go s.collect(stderr)
	go s.wait(cmd, done)

	ready := make(chan struct{})
	go func() {
		defer close(ready)
		_ = poll(ctx, s.startTimeout, s.name+" healthy", func() bool {
			select {
			case <-done:
				return true
			default:
			}
			return s.healthy(ctx)
		})
	}()
	<-ready
	select {
	case <-done:
		return fmt.Errorf("%s exited during start:\n%s", s.name, s.lastLines(20))
	default:
	}
	if !s.healthy(ctx) {
		return fmt.Errorf("%s not healthy within %s:\n%s", s.name, s.startTimeout, s.lastLines(20))
	}
	return nil
}

func (s *service) healthy(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.base+"/healthz", nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode == http.StatusOK
}

// collect copies the service's log (stderr) to its log file and keeps the
// last lines for error messages.
func (s *service) collect(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		fmt.Fprintln(s.logf, line)
		s.mu.Lock()
		if len(s.tail) == 50 {
			s.tail = s.tail[1:]
		}
		s.tail = append(s.tail, line)
		s.mu.Unlock()
	}
	_, _ = io.Copy(io.Discard, r)
}

// wait reaps the process; an exit nobody asked for is recorded and the
// service is started again after a second.
func (s *service) wait(cmd *exec.Cmd, done chan struct{}) {
	err := cmd.Wait()
	s.mu.Lock()
	expected := s.expected
	if !expected {
		s.exits = append(s.exits, fmt.Sprintf("%s exited by itself (%v); last log lines:\n%s", s.name, err, strings.Join(lastN(s.tail, 15), "\n")))
	}
	s.mu.Unlock()
	fmt.Fprintf(s.logf, "=== %s exited (%v), expected=%t, %s\n", s.name, err, expected, time.Now().Format(time.RFC3339Nano))
	close(done)
	if expected {
		return
	}
	go func() {
		if !wait(s.ctx, time.Second) {
			return
		}
		if err := s.start(s.ctx); err != nil && s.ctx.Err() == nil {
			s.mu.Lock()
			s.exits = append(s.exits, fmt.Sprintf("%s could not be restarted: %v", s.name, err))
			s.mu.Unlock()
		}
	}()
}

func (s *service) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done == nil {
		return false
	}
	select {
	case <-s.done:
		return false
	default:
		return true
	}
}

// signal sends sig to the running process and waits for its exit, up to
// timeout; it reports whether the process exited.
func (s *service) signal(sig syscall.Signal, timeout time.Duration) bool {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	if cmd == nil {
		s.mu.Unlock()
		return true
	}
	s.expected = true
	s.mu.Unlock()
	_ = cmd.Process.Signal(sig)
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// kill sends SIGKILL and waits until the process is gone.
func (s *service) kill() error {
	if !s.signal(syscall.SIGKILL, 30*time.Second) {
		return fmt.Errorf("%s survived SIGKILL for 30s", s.name)
	}
	return nil
}

// stop sends SIGTERM, and SIGKILL if the service ignores it for 30s.
func (s *service) stop() error {
	s.startMu.Lock() // no automatic restart races the stop
	defer s.startMu.Unlock()
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	if s.signal(syscall.SIGTERM, 30*time.Second) {
		return nil
	}
	err := fmt.Errorf("%s ignored SIGTERM for 30s", s.name)
	if kerr := s.kill(); kerr != nil {
		return errors.Join(err, kerr)
	}
	return err
}

// close stops the service and closes its log.
func (s *service) close() error {
	err := s.stop()
	_ = s.logf.Close()
	return err
}

// unexpectedExits returns the exits nobody asked for.
func (s *service) unexpectedExits() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.exits...)
}

func (s *service) lastLines(n int) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(lastN(s.tail, n), "\n")
}

func lastN(lines []string, n int) []string {
	if len(lines) > n {
		return lines[len(lines)-n:]
	}
	return lines
}
