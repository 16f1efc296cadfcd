package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgCluster is a PostgreSQL cluster of the suite's own: its data directory
// and socket in the run's temporary directory and a port of its own, so
// stopping or killing it never touches the shared server the tests use.
type pgCluster struct {
	bin  string // directory of initdb, pg_ctl, postgres
	dir  string // owned by the postgres OS user when the suite runs as root
	data string
	port int
	log  string
}

// findPGBin returns the bin directory of the PostgreSQL to run: $FAULTS_PG_BIN,
// or the newest /usr/lib/postgresql/*/bin (the Debian layout), or the one
// whose initdb is on PATH.
func findPGBin() (string, error) {
	if dir := os.Getenv("FAULTS_PG_BIN"); dir != "" {
		return dir, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return versionOf(b) - versionOf(a) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("no PostgreSQL found: install postgresql (initdb, pg_ctl) or set FAULTS_PG_BIN")
}

// versionOf is the major version in a /usr/lib/postgresql/<n>/bin path.
func versionOf(binDir string) int {
	n, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return n
}

// asPostgres builds a command that runs as the postgres OS user when the
// suite runs as root (PostgreSQL refuses to run as root), as the current
// user otherwise.
func asPostgres(ctx context.Context, name string, args ...string) *exec.Cmd {
	var cmd *exec.Cmd
	if os.Geteuid() == 0 {
		cmd = exec.CommandContext(ctx, "runuser", append([]string{"-u", "postgres", "--", name}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, name, args...)
	}
	cmd.Dir = "/"
	setGroupAttr(cmd)
	return cmd
}

func run(cmd *exec.Cmd) error {
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(cmd.Args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// newPGCluster runs initdb in dir/pg (trust authentication on loopback
// only) and configures the port.
func newPGCluster(ctx context.Context, dir string, port int) (*pgCluster, error) {
	bin, err := findPGBin()
	if err != nil {
		return nil, err
	}
	c := &pgCluster{bin: bin, dir: filepath.Join(dir, "pg"), port: port}
	c.data, c.log = filepath.Join(c.dir, "data"), filepath.Join(c.dir, "server.log")
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return nil, fmt.Errorf("postgres dir: %w", err)
	}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root needs the postgres OS user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(c.dir, uid, gid); err != nil {
			return nil, fmt.Errorf("chown %s: %w", c.dir, err)
		}
	}
	// --no-sync: initdb's own fsyncs only; the server runs with fsync on.
	if err := run(asPostgres(ctx, filepath.Join(bin, "initdb"), "-D", c.data, "-A", "trust", "-U", "postgres",
		"-E", "UTF8", "--locale=C", "--no-sync")); err != nil {
		return nil, fmt.Errorf("initdb: %w", err)
	}
	conf := fmt.Sprintf(`
# statemill fault suite: a private cluster on loopback.
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = '%s'
max_connections = 200
fsync = on
synchronous_commit = on
shared_buffers = 64MB
log_min_messages = warning
`, port, c.dir)
	f, err := os.OpenFile(filepath.Join(c.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("postgresql.conf: %w", err)
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("postgresql.conf: %w", err)
	}
	return c, nil
}

// start starts the server and waits until it accepts connections. After a
// kill -9 the old backends may still hold the shared memory for a moment,
// so a refused start is retried until the deadline.
func (c *pgCluster) start(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := run(asPostgres(ctx, filepath.Join(c.bin, "pg_ctl"), "-D", c.data, "-l", c.log, "-w", "-t", "60", "start"))
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("start postgres: %w (log: %s)", err, c.log)
		}
		if !wait(ctx, 300*time.Millisecond) {
			return ctx.Err()
		}
	}
}

// stop shuts the server down in fast mode (clients are disconnected,
// transactions in flight roll back): what an operator's restart does.
func (c *pgCluster) stop(ctx context.Context) error {
	if err := run(asPostgres(ctx, filepath.Join(c.bin, "pg_ctl"), "-D", c.data, "-m", "fast", "-w", "-t", "60", "stop")); err != nil {
		return fmt.Errorf("stop postgres: %w", err)
	}
	return nil
}

// kill sends SIGKILL to the postmaster, as a crash would, and waits until
// it is gone; its backends notice and exit on their own.
func (c *pgCluster) kill(ctx context.Context) error {
	pid, err := c.postmasterPID()
	if err != nil {
		return err
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill postmaster %d: %w", pid, err)
	}
	return poll(ctx, 30*time.Second, "postmaster gone", func() bool { return !alive(pid) })
}

func (c *pgCluster) postmasterPID() (int, error) {
	b, err := os.ReadFile(filepath.Join(c.data, "postmaster.pid"))
	if err != nil {
		return 0, fmt.Errorf("postmaster.pid: %w", err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil {
		return 0, fmt.Errorf("postmaster.pid: %w", err)
	}
	return pid, nil
}

// teardown stops the server for good, killing it if a clean stop fails.
func (c *pgCluster) teardown(ctx context.Context) error {
	if _, err := os.Stat(filepath.Join(c.data, "postmaster.pid")); err != nil {
		return nil // not running
	}
	err := c.stop(ctx)
	if err == nil {
		return nil
	}
	if pid, perr := c.postmasterPID(); perr == nil && alive(pid) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	return err
}

// url is the connection string of database db on the cluster.
func (c *pgCluster) url(db string) string {
	u := url.URL{Scheme: "postgres", User: url.User("postgres"), Host: fmt.Sprintf("127.0.0.1:%d", c.port),
		Path: "/" + db, RawQuery: "sslmode=disable"}
	return u.String()
}

// exec runs SQL statements on database db, each on its own (CREATE
// DATABASE cannot run in a transaction).
func (c *pgCluster) exec(ctx context.Context, db string, stmts ...string) error {
	conn, err := pgx.Connect(ctx, c.url(db))
	if err != nil {
		return fmt.Errorf("connect %s: %w", db, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	for _, s := range stmts {
		if _, err := conn.Exec(ctx, s); err != nil {
			return fmt.Errorf("%s: %w", s, err)
		}
	}
	return nil
}

// alive reports whether process pid exists and is not a zombie (a killed
// daemon whose parent does not reap it stays in the process table).
func alive(pid int) bool {
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// The state follows the command name, which is in parentheses.
		if i := bytes.LastIndexByte(b, ')'); i >= 0 && i+2 < len(b) {
			return b[i+2] != 'Z' && b[i+2] != 'X'
		}
	}
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// killPID sends SIGKILL to pid.
func killPID(pid int) error {
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("kill %d: %w", pid, err)
	}
	return nil
}
