package statemill_test

import (
	"bufio"
	"go/parser"
	"go/scanner"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// The layout of DESIGN §2, written down as data. A folder may always import
// itself (infra/web may import infra/apperr). Test files follow the same rules
// as the code they test.
type layoutRule struct {
	folder     string
	mayImport  []string // other top-level folders of this module; "*" means any
	thirdParty bool     // may import modules other than this one (the stdlib always)
	required   bool     // must exist
}

var layoutRules = []layoutRule{
	// the framework, generic: stdlib and third-party only, never the folders below
	{folder: "infra", thirdParty: true, required: true},
	// the published contract of the example domain: stdlib and infra/
	{folder: "events", mayImport: []string{"infra"}, required: true},
	// the Product commands and their input validation: stdlib and infra/
	{folder: "commands", mayImport: []string{"infra"}, required: true},
	// the Product entity, its guards, the command handlers, the replay responder
	{folder: "handlers", mayImport: []string{"commands", "events", "infra"}, thirdParty: true, required: true},
	// read models
	{folder: "projections", mayImport: []string{"events", "infra"}, thirdParty: true},
	// one package main per binary: anything
	{folder: "services", mayImport: []string{"*"}, thirdParty: true, required: true},
}

// Package names that say nothing about what a package holds.
var vagueNames = []string{"util", "utils", "common", "helper", "helpers"}

func TestLayoutImports(t *testing.T) {
	module := modulePath(t)
	fset := token.NewFileSet()
	for _, rule := range layoutRules {
		if !isDir(rule.folder) {
			continue // not written yet: TestLayoutFolders reports the required ones
		}
		for _, file := range goFiles(t, rule.folder) {
			f, err := parser.ParseFile(fset, file, nil, parser.ImportsOnly)
			if err != nil {
				t.Errorf("%s: %v", file, err)
				continue
			}
			for _, imp := range f.Imports {
				path, err := strconv.Unquote(imp.Path.Value)
				if err != nil {
					t.Errorf("%s: bad import %s", fset.Position(imp.Pos()), imp.Path.Value)
					continue
				}
				if msg := rule.check(module, path); msg != "" {
					t.Errorf("%s: imports %q: %s (DESIGN §2)", fset.Position(imp.Pos()), path, msg)
				}
			}
		}
	}
}

// check returns why rule forbids importing path, or "".
func (r layoutRule) check(module, path string) string {
	if path != module && !strings.HasPrefix(path, module+"/") {
		if isStdlib(path) || r.thirdParty {
			return ""
		}
		return r.folder + "/ may import only the standard library and " + r.allowedFolders()
	}
	top, _, _ := strings.Cut(strings.TrimPrefix(strings.TrimPrefix(path, module), "/"), "/")
	if top == r.folder || slices.Contains(r.mayImport, "*") || slices.Contains(r.mayImport, top) {
		return ""
	}
	if top == "" {
		return r.folder + "/ may not import the module root"
	}
	return r.folder + "/ may not import " + top + "/; it may import " + r.allowedFolders()
}

func (r layoutRule) allowedFolders() string {
	folders := []string{r.folder + "/ (itself)"}
	for _, f := range r.mayImport {
		folders = append(folders, f+"/")
	}
	return strings.Join(folders, ", ")
}

func TestLayoutFolders(t *testing.T) {
	known := map[string]bool{}
	for _, rule := range layoutRules {
		known[rule.folder] = true
		if rule.required && !isDir(rule.folder) {
			t.Errorf("top-level folder %s/ is missing (DESIGN §2)", rule.folder)
		}
	}
	// Go code lives only in the folders of the table.
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !e.IsDir() || skipDir(e.Name()) || known[e.Name()] {
			continue
		}
		if files := goFiles(t, e.Name()); len(files) > 0 {
			t.Errorf("%s: Go code in top-level folder %s/, which DESIGN §2 does not have (folders: %s)", files[0], e.Name(), tableFolders())
		}
	}
}

func TestLayoutNoVaguePackageNames(t *testing.T) {
	fset := token.NewFileSet()
	for _, file := range goFiles(t, ".") {
		f, err := parser.ParseFile(fset, file, nil, parser.PackageClauseOnly)
		if err != nil {
			t.Errorf("%s: %v", file, err)
			continue
		}
		name := strings.TrimSuffix(f.Name.Name, "_test")
		dir := filepath.Base(filepath.Dir(file))
		switch {
		case slices.Contains(vagueNames, name):
			t.Errorf("%s: package %s: name a package after what it provides, not util/common/helpers", file, f.Name.Name)
		case slices.Contains(vagueNames, dir):
			t.Errorf("%s: folder %s/: name a package after what it provides, not util/common/helpers", file, dir)
		}
	}
}

// TestLayoutInfraIsGeneric: "Nothing under infra/ names Product". Identifiers,
// string literals and comments of the non-test code under infra/ must not say
// product (production and productive are other words). Test files may: the
// test-only second entity proves infra/ is generic.
func TestLayoutInfraIsGeneric(t *testing.T) {
	if !isDir("infra") {
		t.Fatal("infra/ is missing")
	}
	for _, file := range goFiles(t, "infra") {
		if strings.HasSuffix(file, "_test.go") {
			continue
		}
		src, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		fset := token.NewFileSet()
		var s scanner.Scanner
		s.Init(fset.AddFile(file, -1, len(src)), src, nil, scanner.ScanComments)
		for {
			pos, tok, lit := s.Scan()
			if tok == token.EOF {
				break
			}
			var kind string
			switch tok {
			case token.IDENT:
				kind = "identifier"
			case token.STRING, token.CHAR:
				kind = "string literal"
			case token.COMMENT:
				kind = "comment"
			default:
				continue
			}
			for i, line := range strings.Split(lit, "\n") {
				if namesProduct(line) {
					p := fset.Position(pos)
					p.Line += i
					if i > 0 {
						p.Column = 1
					}
					t.Errorf("%s: %s names product: %q: infra/ is generic, the domain lives in events/, commands/, handlers/ (DESIGN §2)", p, kind, strings.TrimSpace(line))
				}
			}
		}
	}
}

// namesProduct reports whether s contains "product" (any case) other than as
// the start of production/productive/productivity.
func namesProduct(s string) bool {
	lower := strings.ToLower(s)
	for {
		i := strings.Index(lower, "product")
		if i < 0 {
			return false
		}
		rest := lower[i+len("product"):]
		if !strings.HasPrefix(rest, "ion") && !strings.HasPrefix(rest, "iv") {
			return true
		}
		lower = rest
	}
}

func TestLayoutNamesProduct(t *testing.T) {
	for s, want := range map[string]bool{
		"Product": true, "productStore": true, "NewProductRepo": true, "products": true,
		"product_id": true, "PRODUCT": true, "production": false, "Productive": false,
		"productivity": false, "entity": false, "by-product": true,
	} {
		if got := namesProduct(s); got != want {
			t.Errorf("namesProduct(%q) = %v, want %v", s, got, want)
		}
	}
}

func TestLayoutRules(t *testing.T) {
	const m = "example.com/m"
	for _, c := range []struct {
		folder, path string
		ok           bool
	}{
		{"infra", "context", true},
		{"infra", "github.com/jackc/pgx/v5", true},
		{"infra", m + "/infra/apperr", true},
		{"infra", m + "/events", false},
		{"events", m + "/infra/statemachine", true},
		{"events", "github.com/google/uuid", false},
		{"events", m + "/commands", false},
		{"commands", m + "/events", false},
		{"handlers", m + "/events", true},
		{"handlers", m + "/projections/catalog", false},
		{"projections", m + "/handlers", false},
		{"projections", m + "/events", true},
		{"services", m + "/projections/catalog", true},
		{"services", m, true},
		{"handlers", m, false},
	} {
		var rule layoutRule
		for _, r := range layoutRules {
			if r.folder == c.folder {
				rule = r
			}
		}
		if msg := rule.check(m, c.path); (msg == "") != c.ok {
			t.Errorf("%s importing %s: allowed = %v, want %v (%s)", c.folder, c.path, msg == "", c.ok, msg)
		}
	}
}

// goFiles returns every .go file under dir, test files included, skipping
// what the go command ignores (testdata, vendor, _ and . folders).
func goFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != dir && skipDir(d.Name()) {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(path, ".go") && !strings.HasPrefix(d.Name(), ".") && !strings.HasPrefix(d.Name(), "_") {
			files = append(files, path)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func skipDir(name string) bool {
	return name == "testdata" || name == "vendor" || strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_")
}

func isDir(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.IsDir()
}

// isStdlib: standard library import paths have no dot in their first element.
func isStdlib(path string) bool {
	first, _, _ := strings.Cut(path, "/")
	return !strings.Contains(first, ".")
}

func tableFolders() string {
	var names []string
	for _, r := range layoutRules {
		names = append(names, r.folder+"/")
	}
	return strings.Join(names, ", ")
}

func modulePath(t *testing.T) string {
	t.Helper()
	f, err := os.Open("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module"); ok {
			rest = strings.TrimSpace(rest)
			if p, err := strconv.Unquote(rest); err == nil {
				return p
			}
			if rest != "" {
				return rest
			}
		}
	}
	t.Fatal("go.mod: no module line")
	return ""
}
