package main

import (
	"net/http"
	"net/url"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/handlers"
	"github.com/statemill/statemill/infra/commandbus"
	"github.com/statemill/statemill/infra/envelope"
	"github.com/statemill/statemill/infra/replay"
	"github.com/statemill/statemill/infra/web"
)

// api is the HTTP API of DESIGN §4. Commands go over the command bus;
// reads go straight to the repository.
type api struct {
	bus     *commandbus.Bus
	repo    *handlers.Repository
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
	var cmd commands.CreateProduct
	if err := web.DecodeJSON(r, w, &cmd); err != nil {
		web.WriteError(w, r, err)
		return
	}
	if err := cmd.Validate(); err != nil {
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
