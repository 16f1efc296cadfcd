package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/infra/broker"
)

// options are the command-line choices.
type options struct {
	Short     bool
	Out       string
	Scenarios []string // empty: all
	Commands  int      // overrides the mode's number of commands
	Race      bool     // build the services with the race detector
	Keep      bool     // keep the run's directory (logs, data) afterwards
	Progress  io.Writer
}

// params size a run.
type params struct {
	commands   int
	products   int
	clients    int
	duration   time.Duration // the load's pace: its commands spread over this
	deadline   time.Duration // one command, retries included
	hold       time.Duration // scenario 5: the open transaction
	pgDown     time.Duration // scenario 4: how long PostgreSQL stays down
	brokerDown time.Duration // scenario 3: how long RabbitMQ stays down
	settle     time.Duration // after the load: until the system is quiet and converged
}

func paramsFor(o options) params {
	p := params{commands: 10000, products: 300, clients: 8, duration: 40 * time.Second, deadline: 2 * time.Minute,
		hold: 20 * time.Second, pgDown: 5 * time.Second, brokerDown: 3 * time.Second, settle: 3 * time.Minute}
	if o.Short {
		p = params{commands: 1000, products: 100, clients: 8, duration: 8 * time.Second, deadline: 90 * time.Second,
			hold: 5 * time.Second, pgDown: 2 * time.Second, brokerDown: time.Second, settle: 90 * time.Second}
	}
	if o.Commands > 0 {
		p.commands = o.Commands
		p.products = min(p.products, max(1, o.Commands/10))
	}
	return p
}

// suite is one run: a private PostgreSQL cluster and RabbitMQ node, the
// service binaries, and the scenarios run one after the other against them.
type suite struct {
	opts  options
	p     params
	dir   string
	runID string
	bins  map[string]string
	pg    *pgCluster
	mq    *rabbitNode
	log   *slog.Logger
	ports *portPicker
}

// report is the JSON written to $FAULTS_OUT.
type report struct {
	Mode      string    `json:"mode"`
	StartedAt time.Time `json:"started_at"`
	Seconds   float64   `json:"seconds"`
	Params    struct {
		Commands int    `json:"commands"`
		Products int    `json:"products"`
		Clients  int    `json:"clients"`
		Pace     string `json:"pace"`
	} `json:"params"`
	Scenarios []*result `json:"scenarios"`
	OK        bool      `json:"ok"`
}

// runSuite sets up the private servers, runs the scenarios and tears
// everything down, also when ctx is cancelled (Ctrl-C).
func runSuite(ctx context.Context, o options) (rep *report, err error) {
	if o.Progress == nil {
		o.Progress = os.Stderr
	}
	chosen, err := selectScenarios(o.Scenarios)
	if err != nil {
		return nil, err
	}
	s := &suite{opts: o, p: paramsFor(o), log: slog.New(slog.NewTextHandler(o.Progress, nil)), ports: newPortPicker()}
	rep = &report{Mode: "full", StartedAt: time.Now().UTC()}
	if o.Short {
		rep.Mode = "short"
	}
	rep.Params.Commands, rep.Params.Products, rep.Params.Clients = s.p.commands, s.p.products, s.p.clients
	rep.Params.Pace = s.p.duration.String()
	b := make([]byte, 3)
	for i := range b {
		b[i] = "abcdefghijklmnopqrstuvwxyz"[rand.IntN(26)]
	}
	s.runID = string(b)

	cleanStale(s.log)
	if s.dir, err = os.MkdirTemp("", "statemill-faults-"); err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	// The postgres OS user must reach its data directory inside.
	if err := os.Chmod(s.dir, 0o755); err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	s.log.Info("fault suite starting", "mode", rep.Mode, "dir", s.dir, "commands", s.p.commands)
	teardownCtx := context.WithoutCancel(ctx)
	defer func() {
		if terr := s.teardown(teardownCtx); terr != nil {
			err = errors.Join(err, terr)
		} else {
			// The servers are gone: a later run must leave this directory be.
			_ = os.Remove(filepath.Join(s.dir, "state.json"))
		}
		// A failed run keeps its directory: the services' logs explain it.
		if o.Keep || err != nil || !rep.OK {
			s.log.Info("run directory kept (service logs under logs/)", "dir", s.dir)
		} else {
			_ = os.RemoveAll(s.dir)
		}
	}()

	if err := s.setup(ctx, chosen); err != nil {
		return rep, err
	}
	start := time.Now()
	for i, sc := range chosen {
		if ctx.Err() != nil {
			break
		}
		s.log.Info("scenario starting", "n", i+1, "of", len(chosen), "name", sc.name)
		res := s.runScenario(ctx, sc)
		rep.Scenarios = append(rep.Scenarios, res)
		s.log.Info("scenario done", "name", sc.name, "ok", res.OK, "lost", res.Lost, "duplicates_applied", res.DuplicatesApplied,
			"converged", res.Converged, "seconds", res.DurationSeconds, "failures", strings.Join(res.Failures, "; "))
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.OK = len(rep.Scenarios) == len(chosen) && ctx.Err() == nil
	for _, r := range rep.Scenarios {
		rep.OK = rep.OK && r.OK
	}
	return rep, ctx.Err()
}

// state is written into the run's directory so that a later run can clean
// up after one that was killed before its teardown.
type state struct {
	PID        int    `json:"pid"`
	PGBin      string `json:"pg_bin"`
	PGData     string `json:"pg_data"`
	RabbitName string `json:"rabbit_short"`
}

func (s *suite) setup(ctx context.Context, chosen []scenario) error {
	var err error
	if s.pg, err = newPGCluster(ctx, s.dir, s.ports.pick()); err != nil {
		return err
	}
	if s.mq, err = newRabbitNode(s.dir, s.ports.pick(), s.ports.pick()); err != nil {
		return err
	}
	st := state{PID: os.Getpid(), PGBin: s.pg.bin, PGData: s.pg.data, RabbitName: s.mq.short}
	b, _ := json.Marshal(st)
	if err := os.WriteFile(filepath.Join(s.dir, "state.json"), b, 0o644); err != nil {
		return fmt.Errorf("state file: %w", err)
	}
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return s.build(gctx) })
	g.Go(func() error {
		t := time.Now()
		if err := s.pg.start(gctx); err != nil {
			return err
		}
		s.log.Info("postgres started", "port", s.pg.port, "took", time.Since(t).Round(time.Millisecond))
		// Every scenario's databases, now, while the node boots and the
		// services build.
		for _, sc := range chosen {
			for _, db := range scenarioDBs(sc) {
				if err := s.pg.exec(gctx, "postgres", "CREATE DATABASE "+db); err != nil {
					return err
				}
			}
		}
		return nil
	})
	g.Go(func() error {
		t := time.Now()
		if err := s.mq.start(gctx); err != nil {
			return err
		}
		s.log.Info("rabbitmq started", "node", s.mq.node, "port", s.mq.port, "took", time.Since(t).Round(time.Millisecond))
		// Every scenario's vhost in one rabbitmqctl call: each call starts
		// an Erlang VM, seconds on a busy machine.
		return s.mq.addVhosts(gctx, scenarioVhosts(chosen))
	})
	return g.Wait()
}

// build compiles the services into the run's directory: the suite runs
// them as separate processes, as in production.
func (s *suite) build(ctx context.Context) error {
	t := time.Now()
	bins, err := buildServices(ctx, filepath.Join(s.dir, "bin"), s.opts.Race)
	if err != nil {
		return err
	}
	s.bins = bins
	s.log.Info("services built", "took", time.Since(t).Round(time.Millisecond), "race", s.opts.Race)
	return nil
}

// buildServices runs go build for the named services (folders under
// services/; default products and catalog) from the module root into
// binDir, and returns their binaries by name.
func buildServices(ctx context.Context, binDir string, race bool, names ...string) (map[string]string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	if len(names) == 0 {
		names = []string{"products", "catalog"}
	}
	args := []string{"build", "-o", binDir + string(filepath.Separator)}
	if race {
		args = append(args, "-race")
	}
	bins := map[string]string{}
	for _, name := range names {
		args = append(args, "./services/"+name)
		bins[name] = filepath.Join(binDir, name)
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	if err := run(cmd); err != nil {
		return nil, fmt.Errorf("build the services: %w", err)
	}
	return bins, nil
}

// moduleRoot is the directory of go.mod.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the statemill module")
	}
	return filepath.Dir(gomod), nil
}

func (s *suite) teardown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var errs []error
	if s.mq != nil {
		if err := s.mq.teardown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if s.pg != nil {
		if err := s.pg.teardown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// cleanStale stops the servers of earlier runs that were killed before
// their teardown (state.json is still there and its process is gone), and
// removes their directories. A run that tore down removed its state.json,
// so a directory it kept for its logs stays.
func cleanStale(log *slog.Logger) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "statemill-faults-*"))
	for _, dir := range dirs {
		b, err := os.ReadFile(filepath.Join(dir, "state.json"))
		if err != nil {
			continue
		}
		var st state
		if json.Unmarshal(b, &st) != nil || st.PID == 0 || alive(st.PID) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		if _, err := os.Stat(filepath.Join(st.PGData, "postmaster.pid")); err == nil {
			_ = run(asPostgres(ctx, filepath.Join(st.PGBin, "pg_ctl"), "-D", st.PGData, "-m", "immediate", "-w", "stop"))
		}
		if st.RabbitName != "" {
			r := &rabbitNode{short: st.RabbitName}
			for _, pid := range r.beamPIDs() {
				_ = killPID(pid)
			}
		}
		cancel()
		_ = os.RemoveAll(dir)
		log.Info("cleaned up after an earlier run that did not finish", "dir", dir)
	}
}

// portPicker hands out free loopback ports below the kernel's ephemeral
// range, so a port stays free across a service restart: other programs
// that listen on port 0 are never given one of them.
type portPicker struct {
	mu   sync.Mutex
	used map[int]bool
	low  int
}

func newPortPicker() *portPicker {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				low = n
			}
		}
	}
	return &portPicker{used: map[int]bool{}, low: min(low, 32768)}
}

func (p *portPicker) pick() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		port := 20000 + rand.IntN(max(1000, p.low-20000))
		if p.used[port] {
			continue
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		_ = ln.Close()
		p.used[port] = true
		return port
	}
}

// env is one scenario's system: a vhost on the suite's node, databases on
// its cluster, and the services.
type env struct {
	s        *suite
	name     string
	vhost    string
	amqpURL  string // guest, on the vhost
	dbs      map[string]string
	products *service
	catalog  *service
	logDir   string
	cancel   context.CancelFunc // ends automatic restarts
	ctx      context.Context
}

// newEnv prepares a scenario's system and starts its services.
func (s *suite) newEnv(ctx context.Context, sc scenario) (*env, error) {
	e := &env{s: s, name: sc.name, vhost: scenarioVhosts([]scenario{sc})[0]}
	e.ctx, e.cancel = context.WithCancel(ctx)
	e.amqpURL = s.mq.url(e.vhost, "guest", "guest")
	e.logDir = filepath.Join(s.dir, "logs", sc.name)
	if err := os.MkdirAll(e.logDir, 0o755); err != nil {
		return e, fmt.Errorf("log dir: %w", err)
	}
	e.dbs = scenarioDBs(sc)
	// The shared topology and the audit queue exist before the first event
	// is published: the audit must see every one.
	if err := e.withChannel(func(ch *amqp091.Channel) error {
		if err := broker.DeclareShared(broker.WrapAMQPChannel(ch), broker.Topology{}.WithDefaults()); err != nil {
			return err
		}
		if _, err := ch.QueueDeclare(auditQueue, true, false, false, false, nil); err != nil {
			return err
		}
		return ch.QueueBind(auditQueue, "product.#", "events", false, nil)
	}); err != nil {
		return e, fmt.Errorf("topology: %w", err)
	}

	var err error
	if e.products, err = e.newService("products", "products", "products", nil); err != nil {
		return e, err
	}
	if e.catalog, err = e.newService("catalog", "catalog", "catalog", map[string]string{"CATALOG_NAME": "catalog"}); err != nil {
		return e, err
	}
	// Both at once: the catalog's first rebuild waits (with backoff) for
	// the products service's replay responder if it comes first.
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return e.products.start(gctx) })
	g.Go(func() error { return e.catalog.start(gctx) })
	if err := g.Wait(); err != nil {
		return e, err
	}
	if err := s.pg.exec(ctx, e.dbs["products"], `CREATE TABLE IF NOT EXISTS faults_hold (at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return e, err
	}
	// The catalog's migrations ran before it listened: its table exists.
	if err := s.pg.exec(ctx, e.dbs["catalog"], appliedAuditSQL...); err != nil {
		return e, fmt.Errorf("applied audit: %w", err)
	}
	// A new catalog fills itself from history at its first start (an empty
	// replay here); the load starts once that is done.
	if err := waitRebuilt(ctx, e.catalog.base, time.Minute); err != nil {
		return e, fmt.Errorf("the catalog's first rebuild: %w", err)
	}
	return e, nil
}

// waitRebuilt waits until a new catalog's automatic first rebuild has
// completed. A "failed" state is not final here: when the catalog starts
// before the products service's replay responder, the request finds no
// queue, the run is recorded as failed, and the worker retries with backoff.
func waitRebuilt(ctx context.Context, base string, timeout time.Duration) error {
	var st catalogStatus
	var err error
	if perr := poll(ctx, timeout, "the rebuild to complete", func() bool {
		st, err = getStatus(ctx, base)
		return err == nil && st.Rebuild.State == "completed"
	}); perr != nil {
		return fmt.Errorf("%w (last state %q %s, err %v)", perr, st.Rebuild.State, st.Rebuild.Error, err)
	}
	return nil
}

func (e *env) newService(name, bin, db string, extra map[string]string) (*service, error) {
	vars := map[string]string{
		"DATABASE_URL":      e.s.pg.url(e.dbs[db]),
		"AMQP_URL":          e.amqpURL,
		"EVENTS_EXCHANGE":   "events",
		"COMMANDS_EXCHANGE": "commands",
		"LOG_LEVEL":         "warn",
	}
	for k, v := range extra {
		vars[k] = v
	}
	return newService(e.ctx, name, e.s.bins[bin], filepath.Join(e.logDir, name+".log"), e.s.ports.pick(), vars)
}

func (e *env) withChannel(fn func(*amqp091.Channel) error) error {
	conn, err := amqp091.Dial(e.amqpURL)
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	defer ch.Close()
	return fn(ch)
}

// teardown stops the services and removes the vhost and databases.
func (e *env) teardown(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 2*time.Minute)
	defer cancel()
	e.cancel()
	var errs []error
	for _, svc := range []*service{e.products, e.catalog} {
		if svc != nil {
			if err := svc.close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if e.s.opts.Keep {
		return errors.Join(errs...)
	}
	// The vhost stays (deleting it costs a rabbitmqctl call); the node
	// goes at the end of the run.
	for _, db := range e.dbs {
		if err := e.s.pg.exec(ctx, "postgres", "DROP DATABASE IF EXISTS "+db+" WITH (FORCE)"); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// heal makes sure every part runs again after the scenario's faults.
func (e *env) heal(ctx context.Context) error {
	if err := e.s.mq.waitReady(ctx, 2*time.Minute); err != nil {
		if err := e.s.mq.start(ctx); err != nil {
			return fmt.Errorf("heal rabbitmq: %w", err)
		}
	}
	if err := e.s.pg.exec(ctx, "postgres", "SELECT 1"); err != nil {
		if err := e.s.pg.start(ctx); err != nil {
			return fmt.Errorf("heal postgres: %w", err)
		}
	}
	for _, svc := range []*service{e.products, e.catalog} {
		if err := svc.start(ctx); err != nil {
			return fmt.Errorf("heal: %w", err)
		}
	}
	return nil
}

// scenarioDBs names a scenario's databases by role.
func scenarioDBs(sc scenario) map[string]string {
	suffix := strings.ReplaceAll(sc.name, "-", "_")
	return map[string]string{"products": "products_" + suffix, "catalog": "catalog_" + suffix, "verify": "verify_" + suffix}
}

func scenarioVhosts(chosen []scenario) []string {
	var out []string
	for _, sc := range chosen {
		out = append(out, "faults-"+sc.name)
	}
	return out
}

// selectScenarios returns the scenarios named (all when none is).
func selectScenarios(names []string) ([]scenario, error) {
	all := scenarios()
	if len(names) == 0 {
		return all, nil
	}
	var out []scenario
	for _, n := range names {
		i := slices.IndexFunc(all, func(s scenario) bool { return s.name == n || strconv.Itoa(s.number) == n })
		if i < 0 {
			var known []string
			for _, s := range all {
				known = append(known, s.name)
			}
			return nil, fmt.Errorf("unknown scenario %q (known: %s)", n, strings.Join(known, ", "))
		}
		out = append(out, all[i])
	}
	return out, nil
}

// wait waits d or until ctx is done; it reports whether d passed.
func wait(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// poll checks cond every 100ms until it holds, ctx ends or timeout passes.
func poll(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-deadline.C:
			return fmt.Errorf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
	return nil
}
