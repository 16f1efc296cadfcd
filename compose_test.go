package statemill_test

import (
	"context"
	"fmt"
	"go/ast"
	"go/build"
	"go/parser"
	"go/token"
	"maps"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
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
