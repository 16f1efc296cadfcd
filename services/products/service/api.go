package service

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/handlers"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/commandbus"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/web"
)

// api is the HTTP API of DESIGN §4. Commands go over the command bus;
// reads go straight to the repository.
type api struct {
	bus     *commandbus.Bus
	repo    handlers.Repository
	replays *replay.Responder
}

func (a *api) routes(r *web.Router) {
	r.HandleFunc("GET /api/products", a.list)
	r.HandleFunc("POST /api/products", a.create)
	r.HandleFunc("GET /api/products/{id}", a.get)
	r.HandleFunc("PUT /api/products/{id}", a.adjust)
	r.HandleFunc("DELETE /api/products/{id}", a.discontinue)
	r.HandleFunc("GET /api/products/{id}/history", a.history)
	r.HandleFunc("POST /api/replays", a.requestReplay)
	r.HandleFunc("GET /api/replays/{id}", a.getReplay)
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	page, err := web.ParsePage(r, 100, 1000)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	products, err := a.repo.List(r.Context(), page.After, page.Limit)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	if len(products) == page.Limit {
		web.SetNextLink(w, r, products[len(products)-1].ID, page.Limit)
	}
	if products == nil {
		products = []*handlers.Product{}
	}
	web.WriteJSON(w, http.StatusOK, products)
}

func (a *api) get(w http.ResponseWriter, r *http.Request) {
	p, err := a.repo.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	writeProduct(w, http.StatusOK, p)
}

func (a *api) history(w http.ResponseWriter, r *http.Request) {
	events, err := a.repo.History(r.Context(), r.PathValue("id"))
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, events)
}

func (a *api) create(w http.ResponseWriter, r *http.Request) {
	// The body is decoded on its own so that command fields which are not
	// body fields (the idempotency key) cannot be set from it.
	var body struct {
		Name             string `json:"name"`
		Price            int64  `json:"price"`
		InitialInventory int64  `json:"initial_inventory"`
	}
	if err := web.DecodeJSON(r, w, &body); err != nil {
		web.WriteError(w, r, err)
		return
	}
	cmd := commands.CreateProduct{Name: body.Name, Price: body.Price, InitialInventory: body.InitialInventory}
	if err := cmd.Validate(); err != nil {
		web.WriteError(w, r, err)
		return
	}
	var err error
	if cmd.Idempotency, err = idempotency(r, body); err != nil {
		web.WriteError(w, r, err)
		return
	}
	p, err := send[*handlers.Product](a, r, &cmd)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/products/"+url.PathEscape(p.ID))
	writeProduct(w, http.StatusCreated, p)
}

func (a *api) adjust(w http.ResponseWriter, r *http.Request) {
	// The body names only the adjustment: the id and version come from
	// the path and If-Match, so they are not body fields.
	var body struct {
		Adjust *int64 `json:"adjust_inventory"`
	}
	if err := web.DecodeJSON(r, w, &body); err != nil {
		web.WriteError(w, r, err)
		return
	}
	cmd := commands.AdjustInventory{Adjust: body.Adjust}
	if err := cmd.Validate(); err != nil {
		web.WriteError(w, r, err)
		return
	}
	var err error
	if cmd.Idempotency, err = idempotency(r, body); err != nil {
		web.WriteError(w, r, err)
		return
	}
	version, err := ifVersion(r)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	cmd.ProductID, cmd.IfVersion = r.PathValue("id"), version
	p, err := send[*handlers.Product](a, r, &cmd)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	writeProduct(w, http.StatusOK, p)
}

func (a *api) discontinue(w http.ResponseWriter, r *http.Request) {
	version, err := ifVersion(r)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	cmd := commands.DiscontinueProduct{ProductID: r.PathValue("id"), IfVersion: version}
	if cmd.Idempotency, err = idempotency(r, nil); err != nil {
		web.WriteError(w, r, err)
		return
	}
	p, err := send[*handlers.Product](a, r, &cmd)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	writeProduct(w, http.StatusOK, p)
}

// requestReplay records a replay request; the responder's pool runs it
// (202), and GET /api/replays/{id} tells how it went.
func (a *api) requestReplay(w http.ResponseWriter, r *http.Request) {
	var req replay.Request
	if err := web.DecodeJSON(r, w, &req); err != nil {
		web.WriteError(w, r, err)
		return
	}
	req, err := a.replays.Submit(r.Context(), req)
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	w.Header().Set("Location", "/api/replays/"+url.PathEscape(req.ReplayID))
	web.WriteJSON(w, http.StatusAccepted, map[string]string{"replay_id": req.ReplayID})
}

func (a *api) getReplay(w http.ResponseWriter, r *http.Request) {
	rec, err := a.replays.Get(r.Context(), r.PathValue("id"))
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, rec)
}

// send puts cmd on the bus with the request id as its correlation id.
func send[R any, C any](a *api, r *http.Request, cmd *C) (R, error) {
	ctx := envelope.WithCorrelationID(r.Context(), web.RequestIDFrom(r.Context()))
	return commandbus.Send[R](ctx, a.bus, cmd)
}

// IdempotencyKeyHeader makes a POST, PUT or DELETE safe to retry.
const IdempotencyKeyHeader = "Idempotency-Key"

// idempotency reads the Idempotency-Key header and fingerprints the request
// (method, path, If-Match and the decoded body), so that a key reused for a
// different request is refused rather than answered with another's outcome.
func idempotency(r *http.Request, body any) (commands.Idempotency, error) {
	key := r.Header.Get(IdempotencyKeyHeader)
	if key == "" {
		return commands.Idempotency{}, nil
	}
	if len(key) > 255 || strings.IndexFunc(key, func(c rune) bool { return c < 0x21 || c > 0x7e }) >= 0 {
		return commands.Idempotency{}, apperr.Field(IdempotencyKeyHeader, "must be 1 to 255 visible ASCII characters")
	}
	b, err := json.Marshal(body)
	if err != nil {
		return commands.Idempotency{}, fmt.Errorf("fingerprint: %w", err)
	}
	sum := sha256.Sum256([]byte(r.Method + " " + r.URL.Path + "\n" + r.Header.Get("If-Match") + "\n" + string(b)))
	return commands.Idempotency{Key: key, Fingerprint: hex.EncodeToString(sum[:])}, nil
}

// ifVersion is the version an If-Match header asks for, or 0 for none.
func ifVersion(r *http.Request) (int64, error) {
	v, ok, err := web.IfMatch(r)
	if err != nil || !ok {
		return 0, err
	}
	return v, nil
}

func writeProduct(w http.ResponseWriter, status int, p *handlers.Product) {
	w.Header().Set("ETag", web.ETag(p.Version))
	web.WriteJSON(w, status, p)
}

func promHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
}
