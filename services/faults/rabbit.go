package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// rabbitNode is a RabbitMQ node of the suite's own: its own node name,
// ports, database, logs and Erlang cookie, all in the run's temporary
// directory. Stopping or killing it never touches the shared node on 5672.
type rabbitNode struct {
	sbin     string // directory of rabbitmq-server and rabbitmqctl (not the Debian su wrapper)
	dir      string
	node     string // faults-<hex>@localhost
	short    string // faults-<hex>: unique on the machine, it names the beam process
	port     int
	distPort int
	env      []string
}

// findRabbitSbin returns the directory of the real RabbitMQ scripts. The
// Debian /usr/sbin wrappers switch to the rabbitmq user with su, which
// resets HOME (and so the cookie) and cannot write the suite's directory.
func findRabbitSbin() (string, error) {
	candidates := []string{os.Getenv("FAULTS_RABBITMQ_SBIN"), "/usr/lib/rabbitmq/bin"}
	globbed, _ := filepath.Glob("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin")
	candidates = append(candidates, globbed...)
	candidates = append(candidates, "/opt/rabbitmq/sbin", "/usr/local/sbin")
	for _, d := range candidates {
		if d == "" {
			continue
		}
		if _, err := os.Stat(filepath.Join(d, "rabbitmq-server")); err == nil {
			return d, nil
		}
	}
	return "", errors.New("no RabbitMQ found: install rabbitmq-server or set FAULTS_RABBITMQ_SBIN to the directory of its scripts")
}

// newRabbitNode prepares the node's files; start starts it.
func newRabbitNode(dir string, port, distPort int) (*rabbitNode, error) {
	sbin, err := findRabbitSbin()
	if err != nil {
		return nil, err
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	r := &rabbitNode{sbin: sbin, dir: filepath.Join(dir, "rabbitmq"), short: "faults-" + hex.EncodeToString(b), port: port, distPort: distPort}
	r.node = r.short + "@localhost"
	home := filepath.Join(r.dir, "home")
	for _, d := range []string{home, filepath.Join(r.dir, "mnesia"), filepath.Join(r.dir, "log")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("rabbitmq dir: %w", err)
		}
	}
	cookie := make([]byte, 20)
	_, _ = rand.Read(cookie)
	files := map[string]string{
		filepath.Join(home, ".erlang.cookie"): strings.ToUpper(hex.EncodeToString(cookie)),
		// No plugins: management would bind 15672, which the shared node may use.
		filepath.Join(r.dir, "enabled_plugins"): "[].\n",
		// Its own config file, or the machine's (listening on 5672) would apply.
		filepath.Join(r.dir, "rabbitmq.conf"):     fmt.Sprintf("listeners.tcp.1 = 127.0.0.1:%d\nloopback_users.guest = true\n", port),
		filepath.Join(r.dir, "rabbitmq-env.conf"): "# empty: the machine's rabbitmq-env.conf names the shared node\n",
	}
	for path, content := range files {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			return nil, fmt.Errorf("rabbitmq: %w", err)
		}
	}
	if err := os.Chmod(filepath.Join(home, ".erlang.cookie"), 0o400); err != nil {
		return nil, fmt.Errorf("rabbitmq cookie: %w", err)
	}
	r.env = append(os.Environ(),
		"HOME="+home,
		"RABBITMQ_NODENAME="+r.node,
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		"RABBITMQ_NODE_PORT="+strconv.Itoa(port),
		"RABBITMQ_DIST_PORT="+strconv.Itoa(distPort),
		"RABBITMQ_MNESIA_BASE="+filepath.Join(r.dir, "mnesia"),
		"RABBITMQ_LOG_BASE="+filepath.Join(r.dir, "log"),
		"RABBITMQ_PID_FILE="+filepath.Join(r.dir, "rabbitmq.pid"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(r.dir, "enabled_plugins"),
		"RABBITMQ_PLUGINS_EXPAND_DIR="+filepath.Join(r.dir, "plugins-expand"),
		"RABBITMQ_CONFIG_FILE="+filepath.Join(r.dir, "rabbitmq.conf"),
		"RABBITMQ_ADVANCED_CONFIG_FILE="+filepath.Join(r.dir, "advanced.config"),
		"RABBITMQ_CONF_ENV_FILE="+filepath.Join(r.dir, "rabbitmq-env.conf"),
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
		"ERL_EPMD_ADDRESS=127.0.0.1",
	)
	return r, nil
}

// start boots the node in the background and waits until it accepts AMQP
// connections.
func (r *rabbitNode) start(ctx context.Context) error {
	cmd := exec.CommandContext(ctx, filepath.Join(r.sbin, "rabbitmq-server"), "-detached")
	cmd.Env, cmd.Dir = r.env, r.dir
	setGroupAttr(cmd)
	if err := run(cmd); err != nil {
		return fmt.Errorf("start rabbitmq: %w", err)
	}
	return r.waitReady(ctx, 120*time.Second)
}

// waitReady polls an AMQP connection as guest until one opens: the
// listener starts at the end of the boot.
func (r *rabbitNode) waitReady(ctx context.Context, timeout time.Duration) error {
	err := poll(ctx, timeout, "rabbitmq node "+r.node+" accepting connections", func() bool {
		conn, err := amqp091.DialConfig(r.url("/", "guest", "guest"), amqp091.Config{Dial: amqp091.DefaultDial(2 * time.Second)})
		if err != nil {
			return false
		}
		_ = conn.Close()
		return true
	})
	if err != nil {
		return fmt.Errorf("%w (logs in %s)", err, filepath.Join(r.dir, "log"))
	}
	return nil
}

// ctl runs rabbitmqctl against the node.
func (r *rabbitNode) ctl(ctx context.Context, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(r.sbin, "rabbitmqctl"), append([]string{"-n", r.node, "-q"}, args...)...)
	cmd.Env, cmd.Dir = r.env, r.dir
	setGroupAttr(cmd)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("rabbitmqctl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// addVhosts creates vhosts with full permissions for guest, in one
// definitions import.
func (r *rabbitNode) addVhosts(ctx context.Context, vhosts []string) error {
	type perm struct {
		User      string `json:"user"`
		Vhost     string `json:"vhost"`
		Configure string `json:"configure"`
		Write     string `json:"write"`
		Read      string `json:"read"`
	}
	var defs struct {
		Vhosts      []map[string]string `json:"vhosts"`
		Permissions []perm              `json:"permissions"`
	}
	for _, v := range vhosts {
		defs.Vhosts = append(defs.Vhosts, map[string]string{"name": v})
		defs.Permissions = append(defs.Permissions, perm{"guest", v, ".*", ".*", ".*"})
	}
	b, err := json.Marshal(defs)
	if err != nil {
		return fmt.Errorf("vhosts: %w", err)
	}
	path := filepath.Join(r.dir, "vhosts.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("vhosts: %w", err)
	}
	_, err = r.ctl(ctx, "import_definitions", path)
	return err
}

// stopApp stops the RabbitMQ application (the Erlang node stays up): every
// connection drops, durable queues and persistent messages stay.
func (r *rabbitNode) stopApp(ctx context.Context) error {
	_, err := r.ctl(ctx, "stop_app")
	return err
}

func (r *rabbitNode) startApp(ctx context.Context) error {
	if _, err := r.ctl(ctx, "start_app"); err != nil {
		return err
	}
	return r.waitReady(ctx, 60*time.Second)
}

// kill sends SIGKILL to the node's Erlang VM, as a crash would, and waits
// until it is gone and epmd has forgotten it.
func (r *rabbitNode) kill(ctx context.Context) error {
	pids := r.beamPIDs()
	if len(pids) == 0 {
		return fmt.Errorf("rabbitmq: no beam.smp process names %s", r.short)
	}
	for _, pid := range pids {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return fmt.Errorf("kill beam %d: %w", pid, err)
		}
	}
	return poll(ctx, 30*time.Second, "beam of "+r.node+" gone", func() bool {
		for _, pid := range pids {
			if alive(pid) {
				return false
			}
		}
		return !r.registered()
	})
}

// beamPIDs finds the Erlang VMs of the node. RabbitMQ names the node at
// boot, so the name is not on the command line; it is in the environment
// the node was started with (RABBITMQ_NODENAME).
func (r *rabbitNode) beamPIDs() []int {
	entries, _ := os.ReadDir("/proc")
	want := []byte("RABBITMQ_NODENAME=" + r.short + "@")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(bytes.SplitN(cmdline, []byte{0}, 2)[0], []byte("beam")) {
			continue
		}
		environ, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		for _, kv := range bytes.Split(environ, []byte{0}) {
			if bytes.HasPrefix(kv, want) && alive(pid) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// registered reports whether epmd still lists the node (false when epmd
// cannot be asked: nothing then keeps the name).
func (r *rabbitNode) registered() bool {
	epmd, err := exec.LookPath("epmd")
	if err != nil {
		return false
	}
	out, err := exec.Command(epmd, "-names").Output()
	if err != nil {
		return false
	}
	return bytes.Contains(out, []byte("name "+r.short+" "))
}

// teardown stops the node for good (killing it if a clean stop fails) and
// makes sure epmd no longer lists it. epmd itself stays: the shared node
// uses it.
func (r *rabbitNode) teardown(ctx context.Context) error {
	if len(r.beamPIDs()) == 0 {
		return nil
	}
	_, err := r.ctl(ctx, "stop")
	if err != nil || len(r.beamPIDs()) > 0 {
		if kerr := r.kill(ctx); kerr != nil {
			return errors.Join(err, kerr)
		}
	}
	return poll(ctx, 15*time.Second, "epmd to forget "+r.node, func() bool { return !r.registered() })
}

// url is the AMQP URL of vhost on the node.
func (r *rabbitNode) url(vhost, user, pass string) string {
	path := "/" + url.PathEscape(vhost)
	if vhost == "/" {
		path = "/" // amqp091 reads an empty vhost as "/"
	}
	return fmt.Sprintf("amqp://%s@127.0.0.1:%d%s", url.UserPassword(user, pass).String(), r.port, path)
}
