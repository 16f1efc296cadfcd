package statemill_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"maps"
	"net"
	"net/url"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
)

// The contract between docker-compose.yml and the binaries under services/:
// every service built from our Dockerfile names its folder in the build arg
// SERVICE, and that package main declares the environment it reads in a
// top-level `var envVars = []string{...}`. The compose service must set each of
// those variables, point them at the compose infrastructure, wait for it, and
// publish the port it listens on.

const composeFile = "docker-compose.yml"

// loadCompose parses docker-compose.yml the way `docker compose` does (schema
// validation, merges, normalization), offline and without a Docker engine.
// Interpolation sees an empty environment so the result does not depend on the
// shell the test runs in.
func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	project, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  wd,
		ConfigFiles: []types.ConfigFile{{Filename: filepath.Join(wd, composeFile)}},
		Environment: types.Mapping{},
	}, func(o *loader.Options) {
		o.SetProjectName("statemill", true)
		o.Profiles = []string{"*"} // services behind a profile are checked too
	})
	if err != nil {
		t.Fatalf("load %s: %v", composeFile, err)
	}
	return project
}

func TestComposeInfrastructure(t *testing.T) {
	project := loadCompose(t)
	for _, name := range []string{"postgres", "rabbitmq"} {
		svc, ok := project.Services[name]
		if !ok {
			t.Errorf("%s: no service %q", composeFile, name)
			continue
		}
		if svc.HealthCheck == nil || svc.HealthCheck.Disable || len(svc.HealthCheck.Test) == 0 {
			t.Errorf("%s: service %q needs a healthcheck (the applications wait for service_healthy)", composeFile, name)
		}
	}
}

func TestComposeServicesMatchBinaries(t *testing.T) {
	project := loadCompose(t)
	root, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	ourDockerfile := filepath.Join(root, "Dockerfile")

	var built []string
	for _, name := range slices.Sorted(maps.Keys(project.Services)) {
		svc := project.Services[name]
		if svc.Build == nil || buildDockerfile(root, svc.Build) != ourDockerfile {
			continue
		}
		built = append(built, name)
		t.Run(name, func(t *testing.T) { checkComposeService(t, root, name, svc) })
	}
	if len(built) == 0 {
		t.Fatalf("%s: no service is built from %s", composeFile, ourDockerfile)
	}
	if !slices.Contains(built, "products") {
		t.Errorf("%s: no service products built from %s", composeFile, ourDockerfile)
	}
}

// TestComposePublishedPortsDistinct keeps two services from claiming one host port.
func TestComposePublishedPortsDistinct(t *testing.T) {
	project := loadCompose(t)
	owner := map[string]string{}
	for _, name := range slices.Sorted(maps.Keys(project.Services)) {
		for _, p := range project.Services[name].Ports {
			if p.Published == "" {
				continue
			}
			key := p.HostIP + ":" + p.Published + "/" + p.Protocol
			if other, ok := owner[key]; ok {
				t.Errorf("%s: services %q and %q both publish host port %s", composeFile, other, name, key)
			}
			owner[key] = name
		}
	}
}

var serviceArg = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

func checkComposeService(t *testing.T, root, name string, svc types.ServiceConfig) {
	arg, ok := svc.Build.Args["SERVICE"]
	if !ok || arg == nil || *arg == "" {
		t.Fatalf("%s: service %q is built from the Dockerfile but has no build arg SERVICE", composeFile, name)
	}
	if !serviceArg.MatchString(*arg) {
		t.Fatalf("%s: service %q: build arg SERVICE=%q is not a folder name under services/", composeFile, name, *arg)
	}
	dir := filepath.Join(root, "services", *arg)

	envVars := readEnvVars(t, dir)
	for _, v := range envVars {
		val, ok := svc.Environment[v]
		if !ok || val == nil || *val == "" {
			t.Errorf("%s: service %q does not set %s, which services/%s reads (envVars)", composeFile, name, v, *arg)
		}
	}
	env := func(k string) (string, bool) {
		v, ok := svc.Environment[k]
		if !ok || v == nil || *v == "" {
			return "", false
		}
		return *v, true
	}

	// The URLs point at the compose infrastructure, and the service waits
	// for it to be healthy.
	for _, dep := range []struct{ env, host, scheme string }{
		{"DATABASE_URL", "postgres", "postgres"},
		{"AMQP_URL", "rabbitmq", "amqp"},
	} {
		raw, set := env(dep.env)
		if !set {
			continue // not used by this service, or reported above
		}
		u, err := url.Parse(raw)
		if err != nil {
			t.Errorf("%s: service %q: %s=%q: %v", composeFile, name, dep.env, raw, err)
		} else {
			if u.Hostname() != dep.host {
				t.Errorf("%s: service %q: %s points at host %q, want %q", composeFile, name, dep.env, u.Hostname(), dep.host)
			}
			if u.Scheme != dep.scheme && u.Scheme != dep.scheme+"ql" { // postgresql:// is fine too
				t.Errorf("%s: service %q: %s has scheme %q, want %s://", composeFile, name, dep.env, u.Scheme, dep.scheme)
			}
		}
		d, ok := svc.DependsOn[dep.host]
		switch {
		case !ok:
			t.Errorf("%s: service %q uses %s but does not depend_on %q", composeFile, name, dep.env, dep.host)
		case d.Condition != types.ServiceConditionHealthy:
			t.Errorf("%s: service %q: depends_on %q has condition %q, want %s", composeFile, name, dep.host, d.Condition, types.ServiceConditionHealthy)
		}
	}

	// The port it listens on is published on the same host port.
	addr, set := env("HTTP_ADDR")
	if !set {
		if slices.Contains(envVars, "HTTP_ADDR") {
			return // reported above
		}
		t.Errorf("%s: service %q: services/%s does not list HTTP_ADDR in envVars, but every service serves /healthz", composeFile, name, *arg)
		return
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("%s: service %q: HTTP_ADDR=%q: %v", composeFile, name, addr, err)
		return
	}
	target, err := strconv.ParseUint(port, 10, 16)
	if err != nil || target == 0 {
		t.Errorf("%s: service %q: HTTP_ADDR=%q needs a fixed port in a container", composeFile, name, addr)
		return
	}
	published := false
	for _, p := range svc.Ports {
		if p.Target != uint32(target) {
			continue
		}
		published = true
		if p.Published != port {
			t.Errorf("%s: service %q publishes container port %d on host port %q, want %s (the HTTP_ADDR port)", composeFile, name, target, p.Published, port)
		}
	}
	if !published {
		t.Errorf("%s: service %q listens on HTTP_ADDR=%q but publishes no port %s:%s (ports: %s)", composeFile, name, addr, port, port, portsString(svc.Ports))
	}
}

// readEnvVars checks that dir holds a package main and returns the string
// literals of its top-level `var envVars = []string{...}`.
func readEnvVars(t *testing.T, dir string) []string {
	t.Helper()
	rel, _ := filepath.Rel(mustGetwd(t), dir)
	pkg, err := build.ImportDir(dir, 0)
	if err != nil {
		t.Fatalf("%s: no buildable Go package: %v", rel, err)
	}
	if pkg.Name != "main" {
		t.Fatalf("%s: package %s, want package main (a service is a binary)", rel, pkg.Name)
	}

	fset := token.NewFileSet()
	var files []*ast.File
	consts := map[string]string{} // top-level string constants, to resolve envVars elements
	for _, name := range pkg.GoFiles {
		f, err := parser.ParseFile(fset, filepath.Join(dir, name), nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatalf("%s: %v", rel, err)
		}
		files = append(files, f)
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, id := range vs.Names {
					if i < len(vs.Values) {
						if s, ok := stringLit(vs.Values[i]); ok {
							consts[id.Name] = s
						}
					}
				}
			}
		}
	}

	var found []ast.Expr
	var where []string
	for _, f := range files {
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.VAR {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, id := range vs.Names {
					if id.Name != "envVars" {
						continue
					}
					where = append(where, fset.Position(id.Pos()).String())
					if i < len(vs.Values) {
						found = append(found, vs.Values[i])
					} else {
						found = append(found, nil)
					}
				}
			}
		}
	}
	switch {
	case len(found) == 0:
		t.Fatalf("%s: package main declares no top-level `var envVars = []string{...}` listing the environment variables it reads", rel)
	case len(found) > 1:
		t.Fatalf("%s: envVars declared more than once: %v", rel, where)
	}

	lit, ok := found[0].(*ast.CompositeLit)
	if !ok || !isStringSlice(lit.Type) {
		t.Fatalf("%s: envVars must be initialised with a []string{...} literal", where[0])
	}
	var vars []string
	for _, el := range lit.Elts {
		s, ok := stringLit(el)
		if !ok {
			if id, isIdent := el.(*ast.Ident); isIdent {
				s, ok = consts[id.Name]
			}
		}
		if !ok {
			t.Fatalf("%s: envVars element at %s is not a string literal or a string constant of the package", where[0], fset.Position(el.Pos()))
		}
		if s == "" {
			t.Fatalf("%s: envVars has an empty name", where[0])
		}
		vars = append(vars, s)
	}
	if len(vars) == 0 {
		t.Fatalf("%s: envVars is empty", where[0])
	}
	return vars
}

func isStringSlice(e ast.Expr) bool {
	at, ok := e.(*ast.ArrayType)
	if !ok || at.Len != nil {
		return false
	}
	id, ok := at.Elt.(*ast.Ident)
	return ok && id.Name == "string"
}

func stringLit(e ast.Expr) (string, bool) {
	bl, ok := e.(*ast.BasicLit)
	if !ok || bl.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(bl.Value)
	return s, err == nil
}

// buildDockerfile returns the absolute path of the Dockerfile a build uses.
func buildDockerfile(root string, b *types.BuildConfig) string {
	if b.DockerfileInline != "" {
		return ""
	}
	ctx := b.Context
	if ctx == "" {
		ctx = "."
	}
	if !filepath.IsAbs(ctx) {
		ctx = filepath.Join(root, ctx)
	}
	df := b.Dockerfile
	if df == "" {
		df = "Dockerfile"
	}
	if !filepath.IsAbs(df) {
		df = filepath.Join(ctx, df)
	}
	return filepath.Clean(df)
}

func portsString(ports []types.ServicePortConfig) string {
	if len(ports) == 0 {
		return "none"
	}
	s := ""
	for i, p := range ports {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%s:%d", p.Published, p.Target)
	}
	return s
}

func mustGetwd(t *testing.T) string {
	t.Helper()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return wd
}

// The broker side of docker-compose.yml: the rabbitmq service loads
// rabbitmq/definitions.json (through rabbitmq/rabbitmq.conf) and every
// service connects as its own user of that file, on its vhost, with
// passive declares.

const (
	definitionsFile = "rabbitmq/definitions.json"
	rabbitConfFile  = "rabbitmq/rabbitmq.conf"
)

type definitions struct {
	Users []struct {
		Name             string `json:"name"`
		PasswordHash     string `json:"password_hash"`
		HashingAlgorithm string `json:"hashing_algorithm"`
	} `json:"users"`
	Vhosts []struct {
		Name string `json:"name"`
	} `json:"vhosts"`
	Permissions []struct {
		User  string `json:"user"`
		Vhost string `json:"vhost"`
	} `json:"permissions"`
}

func loadDefinitions(t *testing.T) definitions {
	t.Helper()
	b, err := os.ReadFile(definitionsFile)
	if err != nil {
		t.Fatal(err)
	}
	var d definitions
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("%s: %v", definitionsFile, err)
	}
	return d
}

// rabbitConf returns the value of key in rabbitmq.conf (sysctl format).
func rabbitConf(t *testing.T, key string) (string, bool) {
	t.Helper()
	b, err := os.ReadFile(rabbitConfFile)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}

// rabbitPasswordMatches checks password against a RabbitMQ
// rabbit_password_hashing_sha256 hash: base64 of a 4-byte salt followed by
// SHA-256(salt + password).
func rabbitPasswordMatches(hash, password string) bool {
	b, err := base64.StdEncoding.DecodeString(hash)
	if err != nil || len(b) != 4+sha256.Size {
		return false
	}
	sum := sha256.Sum256(append(slices.Clone(b[:4]), password...))
	return bytes.Equal(sum[:], b[4:])
}

func TestComposeRabbitMQLoadsTheDefinitions(t *testing.T) {
	project := loadCompose(t)
	svc, ok := project.Services["rabbitmq"]
	if !ok {
		t.Fatalf("%s: no service rabbitmq", composeFile)
	}
	root := mustGetwd(t)
	mounted := map[string]string{} // file of the repository → target in the container
	for _, v := range svc.Volumes {
		if v.Type != types.VolumeTypeBind {
			continue
		}
		src := v.Source
		if !filepath.IsAbs(src) {
			src = filepath.Join(root, src)
		}
		rel, err := filepath.Rel(root, filepath.Clean(src))
		if err != nil {
			continue
		}
		mounted[filepath.ToSlash(rel)] = v.Target
		if !v.ReadOnly {
			t.Errorf("%s: rabbitmq mounts %s read-write, want :ro", composeFile, rel)
		}
	}
	defs, ok := mounted[definitionsFile]
	if !ok {
		t.Errorf("%s: rabbitmq does not mount ./%s (mounts: %v)", composeFile, definitionsFile, mounted)
	}
	conf, ok := mounted[rabbitConfFile]
	switch {
	case !ok:
		t.Errorf("%s: rabbitmq does not mount ./%s (mounts: %v)", composeFile, rabbitConfFile, mounted)
	case path.Dir(conf) != "/etc/rabbitmq/conf.d" || path.Ext(conf) != ".conf":
		// The image reads every *.conf of conf.d (its own 10-defaults.conf too).
		t.Errorf("%s: rabbitmq mounts %s at %s, want /etc/rabbitmq/conf.d/<name>.conf", composeFile, rabbitConfFile, conf)
	}
	load, ok := rabbitConf(t, "load_definitions")
	switch {
	case !ok:
		t.Errorf("%s sets no load_definitions", rabbitConfFile)
	case defs != "" && load != defs:
		t.Errorf("%s: load_definitions = %s, but %s mounts %s at %s", rabbitConfFile, load, composeFile, definitionsFile, defs)
	}
}

func TestComposeServicesUseTheirBrokerUsers(t *testing.T) {
	project := loadCompose(t)
	d := loadDefinitions(t)
	users := map[string]string{} // name → password_hash
	for _, u := range d.Users {
		if u.HashingAlgorithm != "rabbit_password_hashing_sha256" {
			t.Errorf("%s: user %s: hashing_algorithm %q, want rabbit_password_hashing_sha256", definitionsFile, u.Name, u.HashingAlgorithm)
		}
		users[u.Name] = u.PasswordHash
	}
	var vhosts []string
	for _, v := range d.Vhosts {
		vhosts = append(vhosts, v.Name)
	}
	root := mustGetwd(t)
	ourDockerfile := filepath.Join(root, "Dockerfile")
	checked := 0
	for _, name := range slices.Sorted(maps.Keys(project.Services)) {
		svc := project.Services[name]
		if svc.Build == nil || buildDockerfile(root, svc.Build) != ourDockerfile {
			continue
		}
		arg := svc.Build.Args["SERVICE"]
		raw, ok := svc.Environment["AMQP_URL"]
		if arg == nil || !ok || raw == nil {
			continue // reported by TestComposeServicesMatchBinaries
		}
		checked++
		// The user is named after the binary: its permissions are the role's.
		want := *arg
		u, err := url.Parse(*raw)
		if err != nil {
			t.Errorf("%s: service %q: AMQP_URL: %v", composeFile, name, err)
			continue
		}
		user := u.User.Username()
		pass, _ := u.User.Password()
		hash, known := users[user]
		switch {
		case user != want:
			t.Errorf("%s: service %q connects as %q, want its own user %q of %s", composeFile, name, user, want, definitionsFile)
		case !known:
			t.Errorf("%s: service %q connects as %q, which %s does not define", composeFile, name, user, definitionsFile)
		case !rabbitPasswordMatches(hash, pass):
			t.Errorf("%s: service %q: the password in AMQP_URL does not match the password_hash of user %q in %s", composeFile, name, user, definitionsFile)
		}
		vhost := strings.TrimPrefix(u.Path, "/")
		if vhost == "" {
			vhost = "/"
		}
		if !slices.Contains(vhosts, vhost) {
			t.Errorf("%s: service %q: AMQP_URL names vhost %q, which %s does not define", composeFile, name, vhost, definitionsFile)
		}
		hasPerm := false
		for _, p := range d.Permissions {
			hasPerm = hasPerm || (p.User == user && p.Vhost == vhost)
		}
		if !hasPerm {
			t.Errorf("%s: service %q: user %q has no permissions on vhost %q in %s", composeFile, name, user, vhost, definitionsFile)
		}
		// Its user may not configure the shared topology: only check it.
		if v := svc.Environment["AMQP_DECLARE"]; v == nil || *v != "passive" {
			t.Errorf("%s: service %q runs as a least-privilege user but does not set AMQP_DECLARE: passive", composeFile, name)
		}
	}
	if checked == 0 {
		t.Fatalf("%s: no service built from %s sets AMQP_URL", composeFile, ourDockerfile)
	}
}
