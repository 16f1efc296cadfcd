//go:build faults

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// lp is the RabbitMQ node of the least-privilege tests, shared by them and
// stopped by TestMain: rabbitmq/definitions.json imported, and each
// service user given a password generated for this run.
var lp struct {
	once sync.Once
	dir  string
	node *rabbitNode
	pw   map[string]string
	err  error
	// turns keeps TestLeastPrivilege, which disturbs the queues of the
	// vhost, and the services of TestServicesUnderLeastPrivilege apart.
	turns sync.Mutex
}

func TestMain(m *testing.M) {
	code := m.Run()
	if lp.node != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		if err := lp.node.teardown(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "least-privilege node:", err)
		}
		cancel()
	}
	if lp.dir != "" {
		_ = os.RemoveAll(lp.dir)
	}
	os.Exit(code)
}

// privateDir makes a directory the postgres OS user can enter, named so
// that a later run of the suite cleans up after a killed one (state.json).
func privateDir(t *testing.T, st state) string {
	t.Helper()
	dir, err := makePrivateDir(st)
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

func makePrivateDir(st state) (string, error) {
	dir, err := os.MkdirTemp("", "statemill-faults-test-")
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	return dir, writeStateFile(dir, st)
}

func writeState(t *testing.T, dir string, st state) {
	t.Helper()
	if err := writeStateFile(dir, st); err != nil {
		t.Fatal(err)
	}
}

func writeStateFile(dir string, st state) error {
	st.PID = os.Getpid()
	b, _ := json.Marshal(st)
	return os.WriteFile(filepath.Join(dir, "state.json"), b, 0o644)
}

func leastPrivilegeNode(t *testing.T) (*rabbitNode, map[string]string) {
	t.Helper()
	lp.once.Do(func() {
		lp.err = func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			var err error
			if lp.dir, err = makePrivateDir(state{}); err != nil {
				return err
			}
			ports := newPortPicker()
			node, err := newRabbitNode(lp.dir, ports.pick(), ports.pick())
			if err != nil {
				return err
			}
			if err := writeStateFile(lp.dir, state{RabbitName: node.short}); err != nil {
				return err
			}
			lp.node = node
			if err := node.start(ctx); err != nil {
				return err
			}
			root, err := moduleRoot(ctx)
			if err != nil {
				return err
			}
			if _, err := node.ctl(ctx, "import_definitions", filepath.Join(root, "rabbitmq", "definitions.json")); err != nil {
				return err
			}
			// The development passwords of the file are replaced by ones
			// generated here: no password is written in the code.
			lp.pw = map[string]string{}
			for _, user := range []string{"products", "catalog", "ui"} {
				b := make([]byte, 24)
				_, _ = rand.Read(b)
				// Hex: a base64url password may start with "-", which
				// rabbitmqctl would take for an option.
				lp.pw[user] = hex.EncodeToString(b)
				if _, err := node.ctl(ctx, "change_password", user, lp.pw[user]); err != nil {
					return err
				}
			}
			return nil
		}()
	})
	if lp.err != nil {
		t.Fatalf("least-privilege node: %v", lp.err)
	}
	return lp.node, lp.pw
}

// refused reports whether err is RabbitMQ's 403 ACCESS_REFUSED.
func refused(err error) bool {
	var ae *amqp091.Error
	return errors.As(err, &ae) && ae.Code == amqp091.AccessRefused
}

// publish publishes with a publisher confirm and reports a refusal (the
// broker closes the channel with 403) as an error.
func publish(ch *amqp091.Channel, exchange, key string) error {
	closed := ch.NotifyClose(make(chan *amqp091.Error, 1))
	if err := ch.Confirm(false); err != nil {
		return err
	}
	dc, err := ch.PublishWithDeferredConfirm(exchange, key, false, false, amqp091.Publishing{
		ContentType: "application/json", Body: []byte(`{}`),
	})
	if err != nil {
		return err
	}
	timeout := time.NewTimer(10 * time.Second)
	defer timeout.Stop()
	select {
	case e := <-closed:
		if e == nil {
			return errors.New("channel closed")
		}
		return e
	case <-dc.Done():
		if dc.Acked() {
			return nil
		}
		// A channel closed by a refusal also ends its confirms.
		select {
		case e := <-closed:
			if e != nil {
				return e
			}
		case <-time.After(time.Second):
		}
		return errors.New("publish not confirmed")
	case <-timeout.C:
		return errors.New("no confirm within 10s")
	}
}

func TestLeastPrivilege(t *testing.T) {
	t.Parallel() // each test has servers of its own
	node, pw := leastPrivilegeNode(t)
	lp.turns.Lock()
	defer lp.turns.Unlock()

	dial := func(user string) *amqp091.Connection {
		t.Helper()
		conn, err := amqp091.Dial(node.url("statemill", user, pw[user]))
		if err != nil {
			t.Fatalf("%s cannot connect to the statemill vhost: %v", user, err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		return conn
	}
	conns := map[string]*amqp091.Connection{"products": dial("products"), "catalog": dial("catalog"), "ui": dial("ui")}
	// Each check gets a channel of its own: a refusal closes the channel.
	do := func(user string, op func(ch *amqp091.Channel) error) error {
		ch, err := conns[user].Channel()
		if err != nil {
			t.Fatalf("%s: channel: %v", user, err)
		}
		defer ch.Close()
		return op(ch)
	}
	allow := func(t *testing.T, user, what string, op func(ch *amqp091.Channel) error) {
		t.Helper()
		if err := do(user, op); err != nil {
			t.Errorf("%s: %s: %v, want it allowed", user, what, err)
		}
	}
	refuse := func(t *testing.T, user, what string, op func(ch *amqp091.Channel) error) {
		t.Helper()
		if err := do(user, op); !refused(err) {
			t.Errorf("%s: %s: %v, want 403 ACCESS_REFUSED", user, what, err)
		}
	}
	pub := func(exchange, key string) func(*amqp091.Channel) error {
		return func(ch *amqp091.Channel) error { return publish(ch, exchange, key) }
	}
	bind := func(queue, key string) func(*amqp091.Channel) error {
		return func(ch *amqp091.Channel) error { return ch.QueueBind(queue, key, "events", false, nil) }
	}
	consume := func(queue string) func(*amqp091.Channel) error {
		return func(ch *amqp091.Channel) error {
			_, err := ch.Consume(queue, "", false, false, false, false, nil)
			return err
		}
	}
	const uiQueue = "ui-0a1b2c3d" // the shape of projection.InstancePrefix("ui")

	t.Run("guest has no access to the vhost", func(t *testing.T) {
		if conn, err := amqp091.Dial(node.url("statemill", "guest", "guest")); err == nil {
			conn.Close()
			t.Error("guest opened the statemill vhost")
		}
	})

	t.Run("only products publishes product events and replays", func(t *testing.T) {
		for _, key := range []string{"product.create", "product.discontinue", "catalog.product.add_inventory",
			"catalog.product.replay_completed", uiQueue + ".product.replay_started"} {
			allow(t, "products", "publish "+key+" to events", pub("events", key))
		}
		for _, key := range []string{"replay.request", "order.create", "catalog.order.create", "#"} {
			refuse(t, "products", "publish "+key+" to events", pub("events", key))
		}
		refuse(t, "products", "publish replay.request to commands", pub("commands", "replay.request"))
		for _, user := range []string{"catalog", "ui"} {
			for _, key := range []string{"product.create", "catalog.product.create"} {
				refuse(t, user, "publish "+key+" to events", pub("events", key))
			}
		}
	})

	t.Run("projections request replays only", func(t *testing.T) {
		for _, user := range []string{"catalog", "ui"} {
			allow(t, user, "publish replay.request to commands", pub("commands", "replay.request"))
			refuse(t, user, "publish replay.other to commands", pub("commands", "replay.other"))
		}
	})

	t.Run("a projection binds only product.# and its own replay prefix", func(t *testing.T) {
		allow(t, "catalog", "bind catalog.live to product.#", bind("catalog.live", "product.#"))
		allow(t, "catalog", "bind catalog.replay to catalog.product.#", bind("catalog.replay", "catalog.product.#"))
		for _, key := range []string{"ui.product.#", uiQueue + ".product.#", "#", "*.product.#", "catalog.#", "product.create"} {
			refuse(t, "catalog", "bind catalog.live to "+key, bind("catalog.live", key))
		}
		allow(t, "ui", "declare its own queue", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare(uiQueue, false, false, false, false, amqp091.Table{"x-expires": int32(60000)})
			return err
		})
		allow(t, "ui", "bind its queue to product.#", bind(uiQueue, "product.#"))
		allow(t, "ui", "bind its queue to its replay prefix", bind(uiQueue, uiQueue+".product.#"))
		refuse(t, "ui", "bind its queue to catalog.product.#", bind(uiQueue, "catalog.product.#"))
		refuse(t, "ui", "bind catalog.live", bind("catalog.live", "product.#"))
	})

	t.Run("no service configures shared objects", func(t *testing.T) {
		for _, user := range []string{"products", "catalog", "ui"} {
			// What products.Run and projection.Worker do at start today
			// (broker.DeclareShared): a non-passive redeclare needs configure.
			refuse(t, user, "redeclare the events exchange", func(ch *amqp091.Channel) error {
				return ch.ExchangeDeclare("events", "topic", true, false, false, false, amqp091.Table{"alternate-exchange": "events.unroutable"})
			})
			refuse(t, user, "delete the events exchange", func(ch *amqp091.Channel) error { return ch.ExchangeDelete("events", false, false) })
			refuse(t, user, "delete catalog.live", func(ch *amqp091.Channel) error {
				_, err := ch.QueueDelete("catalog.live", false, false, false)
				return err
			})
		}
		refuse(t, "catalog", "redeclare catalog.live (as projection.Worker does)", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("catalog.live", true, false, false, false, amqp091.Table{"x-dead-letter-exchange": "catalog.dead"})
			return err
		})
		refuse(t, "catalog", "declare ui.live", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("ui.live", true, false, false, false, nil)
			return err
		})
		refuse(t, "products", "redeclare products.replay_requests (as replay.Responder does)", func(ch *amqp091.Channel) error {
			_, err := ch.QueueDeclare("products.replay_requests", true, false, false, false, amqp091.Table{
				"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "products.replay_requests.dead"})
			return err
		})
	})

	t.Run("passive declares need no permission", func(t *testing.T) {
		for user, names := range map[string][]string{
			"products": {"products.replay_requests", "products.replay_requests.dead", "events.unroutable"},
			"catalog":  {"catalog.live", "catalog.replay", "catalog.dead"},
		} {
			for _, x := range []string{"events", "events.unroutable", "commands"} {
				allow(t, user, "passive declare of exchange "+x, func(ch *amqp091.Channel) error {
					return ch.ExchangeDeclarePassive(x, "topic", true, false, false, false, nil)
				})
			}
			for _, q := range names {
				allow(t, user, "passive declare of queue "+q, func(ch *amqp091.Channel) error {
					_, err := ch.QueueDeclarePassive(q, true, false, false, false, nil)
					return err
				})
			}
		}
	})

	t.Run("each service consumes only its own queues", func(t *testing.T) {
		allow(t, "products", "consume products.replay_requests", consume("products.replay_requests"))
		refuse(t, "products", "consume catalog.live", consume("catalog.live"))
		allow(t, "catalog", "consume catalog.live", consume("catalog.live"))
		allow(t, "catalog", "purge catalog.replay", func(ch *amqp091.Channel) error {
			_, err := ch.QueuePurge("catalog.replay", false)
			return err
		})
		refuse(t, "catalog", "consume products.replay_requests", consume("products.replay_requests"))
		refuse(t, "catalog", "consume events.unroutable", consume("events.unroutable"))
		refuse(t, "ui", "consume catalog.live", consume("catalog.live"))
	})
}

// TestServicesUnderLeastPrivilege runs the products service, the catalog
// and the ui as their own broker users of rabbitmq/definitions.json, with
// AMQP_DECLARE=passive: the topology comes from the definitions, the
// services only check that it exists (the ui declares its own queue, which
// its user may configure). It shows that the users are really limited (the
// products service in the default declare mode is refused), then that the
// catalog fills itself from a replay, the ui from a latest replay, a
// command reaches both, and a rebuild on request completes.
func TestServicesUnderLeastPrivilege(t *testing.T) {
	t.Parallel() // each test has servers of its own
	node, pw := leastPrivilegeNode(t)
	// TestLeastPrivilege publishes stray events, consumes catalog.live and
	// purges catalog.replay on the same vhost: the two take turns (the
	// turn ends after the services have stopped, the first cleanup added
	// runs last).
	lp.turns.Lock()
	t.Cleanup(lp.turns.Unlock)
	ctx := t.Context()

	ports := newPortPicker()
	dir := privateDir(t, state{})
	pg, err := newPGCluster(ctx, dir, ports.pick())
	if err != nil {
		t.Fatal(err)
	}
	writeState(t, dir, state{PGBin: pg.bin, PGData: pg.data})
	t.Cleanup(func() {
		if err := pg.teardown(context.Background()); err != nil {
			t.Error(err)
		}
		_ = os.RemoveAll(dir)
	})
	if err := pg.start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := pg.exec(ctx, "postgres", "CREATE DATABASE products", "CREATE DATABASE catalog"); err != nil {
		t.Fatal(err)
	}
	bins, err := buildServices(ctx, filepath.Join(dir, "bin"), false, "products", "catalog", "ui")
	if err != nil {
		t.Fatal(err)
	}

	env := func(name, user string, extra map[string]string) map[string]string {
		vars := map[string]string{
			"AMQP_URL": node.url("statemill", user, pw[user]), "AMQP_DECLARE": "passive",
			"EVENTS_EXCHANGE": "events", "COMMANDS_EXCHANGE": "commands", "LOG_LEVEL": "warn",
		}
		if name != "ui" { // the ui keeps no database
			vars["DATABASE_URL"] = pg.url(name)
		}
		for k, v := range extra {
			vars[k] = v
		}
		return vars
	}

	// The users are limited for real: the default mode (declare) needs the
	// configure permission products lacks, and the service refuses to
	// start; so does an AMQP_DECLARE it does not know.
	for _, c := range []struct {
		mode, want string
		code       int
	}{
		{"declare", "ACCESS_REFUSED", 1},
		{"Passive", `AMQP_DECLARE: "Passive" is not a declare mode`, 2},
	} {
		vars := env("products", "products", map[string]string{"AMQP_DECLARE": c.mode, "HTTP_ADDR": fmt.Sprintf("127.0.0.1:%d", ports.pick())})
		out, code := runOnce(ctx, t, bins["products"], vars, 2*time.Minute)
		if code != c.code || !strings.Contains(out, c.want) {
			t.Fatalf("products with AMQP_DECLARE=%s: exit code %d, output:\n%s\nwant exit code %d and %q", c.mode, code, out, c.code, c.want)
		}
	}

	start := func(name, user string, extra map[string]string) *service {
		t.Helper()
		svc, err := newService(ctx, name, bins[name], filepath.Join(dir, name+".log"), ports.pick(), env(name, user, extra))
		if err != nil {
			t.Fatal(err)
		}
		svc.startTimeout = 3 * time.Minute
		t.Cleanup(func() {
			_ = svc.close()
			if exits := svc.unexpectedExits(); len(exits) > 0 {
				t.Errorf("%s exited by itself: %s", name, strings.Join(exits, "\n"))
			}
		})
		if err := svc.start(ctx); err != nil {
			t.Fatalf("%s as broker user %q with AMQP_DECLARE=passive: %v", name, user, err)
		}
		return svc
	}
	products := start("products", "products", nil)
	catalog := start("catalog", "catalog", map[string]string{"CATALOG_NAME": "catalog"})
	if err := waitRebuilt(ctx, catalog.base, 3*time.Minute); err != nil {
		t.Fatalf("the catalog's first rebuild (a replay through the products user): %v", err)
	}
	// Healthy means its latest replay is complete.
	ui := start("ui", "ui", map[string]string{"PRODUCTS_URL": products.base})

	res, err := http.Post(products.base+"/api/products", "application/json", bytes.NewReader([]byte(`{"name":"least","price":1,"initial_inventory":2}`)))
	if err != nil {
		t.Fatal(err)
	}
	var created row
	err = json.NewDecoder(res.Body).Decode(&created)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusCreated {
		t.Fatalf("create: %d %v", res.StatusCode, err)
	}
	inCatalog := func() bool {
		rows, err := catalogModel(ctx, catalog.base)
		return err == nil && len(rows) == 1 && rows[0] == created
	}
	if err := poll(ctx, 2*time.Minute, "the product in the catalog", inCatalog); err != nil {
		t.Fatal(err)
	}
	if err := poll(ctx, 2*time.Minute, "the product in the ui", func() bool {
		var page struct {
			Products []row `json:"products"`
		}
		return getJSON(ctx, ui.base+"/ui/products", &page) == nil && len(page.Products) == 1 && page.Products[0] == created
	}); err != nil {
		t.Fatal(err)
	}

	// A rebuild on request: N.replay purged and consumed without
	// redeclaring it, the replay published by the products user.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, catalog.base+"/catalog/rebuild", nil)
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var accepted struct {
		ReplayID string `json:"replay_id"`
	}
	err = json.NewDecoder(res.Body).Decode(&accepted)
	res.Body.Close()
	if err != nil || res.StatusCode != http.StatusAccepted || accepted.ReplayID == "" {
		t.Fatalf("POST /catalog/rebuild: %d %v", res.StatusCode, err)
	}
	var st catalogStatus
	if err := poll(ctx, 3*time.Minute, "the rebuild to complete", func() bool {
		st, err = getStatus(ctx, catalog.base)
		return err == nil && st.Rebuild.ReplayID == accepted.ReplayID && st.Rebuild.State == "completed"
	}); err != nil {
		t.Fatalf("%v (last state %q %s, err %v)", err, st.Rebuild.State, st.Rebuild.Error, err)
	}
	if st.Rebuild.Expected != created.Version || st.Rebuild.Received != created.Version {
		t.Errorf("the rebuild received %d of %d events, want the product's %d transitions", st.Rebuild.Received, st.Rebuild.Expected, created.Version)
	}
	if !inCatalog() {
		rows, err := catalogModel(ctx, catalog.base)
		t.Fatalf("after the rebuild the catalog holds %v (%v), want [%v]", rows, err, created)
	}
}

// runOnce runs bin with the environment vars until it exits (or timeout
// passes: then it is killed) and returns its output and exit code.
func runOnce(ctx context.Context, t *testing.T, bin string, vars map[string]string, timeout time.Duration) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin)
	cmd.Env = os.Environ()
	for k, v := range vars {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &ee) && ctx.Err() == nil:
		return string(out), ee.ExitCode()
	}
	t.Fatalf("%s: %v (did not exit by itself within %s):\n%s", bin, err, timeout, out)
	return "", 0
}
