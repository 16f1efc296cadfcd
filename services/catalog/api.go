package main

import (
	"net/http"

	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/catalog"
)

// api is the catalog's HTTP API.
type api struct {
	reader     *catalog.Reader
	worker     *projection.Worker
	projection *catalog.Projection
}

func (a *api) routes(r *web.Router) {
	r.HandleFunc("GET /catalog/products", a.products)
	r.HandleFunc("GET /catalog/stats", a.stats)
	r.HandleFunc("GET /catalog/status", a.status)
	r.HandleFunc("POST /catalog/rebuild", a.rebuild)
}

func (a *api) products(w http.ResponseWriter, r *http.Request) {
	products, err := a.reader.Products(r.Context(), r.URL.Query().Get("state"))
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, products)
}

func (a *api) stats(w http.ResponseWriter, r *http.Request) {
	stats, err := a.reader.Stats(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, stats)
}

// status is the runtime's status plus the contract check's count.
type status struct {
	projection.Status
	IllegalTransitions int64 `json:"illegal_transitions"`
}

func (a *api) status(w http.ResponseWriter, r *http.Request) {
	st, err := a.worker.Status(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, status{Status: st, IllegalTransitions: a.projection.IllegalTransitions()})
}

func (a *api) rebuild(w http.ResponseWriter, r *http.Request) {
	id, err := a.worker.Rebuild(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	w.Header().Set("Location", "/catalog/status")
	web.WriteJSON(w, http.StatusAccepted, map[string]string{"replay_id": id})
}
