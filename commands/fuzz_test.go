package commands_test

import (
	"bytes"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/web"
)

// FuzzCreateProduct feeds arbitrary bodies through the decoding and
// validation the API uses: every outcome is a valid command or a 4xx error,
// never a 5xx and never a panic.
func FuzzCreateProduct(f *testing.F) {
	for _, seed := range []string{
		`{"name":"candy","price":100,"initial_inventory":2}`,
		`{"name":"  "}`, `{"name":"a","price":-1}`, `{"name":"a","price":99999999999999999999}`,
		`{"name":"a","colour":"red"}`, `{"name":"a"} {}`, `{"name":"\u0000"}`, `null`, ``, `{"name":`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest(http.MethodPost, "/api/products", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		var cmd commands.CreateProduct
		err := web.DecodeJSON(req, httptest.NewRecorder(), &cmd)
		if err == nil {
			err = cmd.Validate()
		}
		if err == nil {
			if cmd.Name == "" || cmd.Price < 0 || cmd.InitialInventory < 0 {
				t.Fatalf("accepted an invalid command: %+v", cmd)
			}
			return
		}
		if status := web.StatusOf(apperr.CodeOf(err)); status < 400 || status > 499 {
			t.Fatalf("body %q: status %d (%v)", body, status, err)
		}
	})
}

// FuzzAdjustInventory does the same for the adjustment body.
func FuzzAdjustInventory(f *testing.F) {
	for _, seed := range []string{`{"adjust_inventory":3}`, `{"adjust_inventory":0}`, `{}`, `{"adjust_inventory":"x"}`, `{"adjust_inventory":1e3}`} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req := httptest.NewRequest(http.MethodPut, "/api/products/x", bytes.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		var b struct {
			Adjust *int64 `json:"adjust_inventory"`
		}
		err := web.DecodeJSON(req, httptest.NewRecorder(), &b)
		if err == nil {
			cmd := commands.AdjustInventory{Adjust: b.Adjust}
			err = cmd.Validate()
			if err == nil && (cmd.Adjust == nil || *cmd.Adjust == 0) {
				t.Fatalf("accepted %q", body)
			}
		}
		if err != nil {
			if status := web.StatusOf(apperr.CodeOf(err)); status < 400 || status > 499 {
				t.Fatalf("body %q: status %d (%v)", body, status, err)
			}
		}
	})
}
