package service

import (
	"context"
	"net/http"

	"github.com/statemill/statemill/infra/web"
	"github.com/statemill/statemill/projections/catalog"
)

// api is the catalog's HTTP API, over the PostgreSQL read model and its
// worker or over the in-memory one and its view.
type api struct {
	queries catalog.Queries
	status  func(context.Context) (any, error)
	rebuild func(context.Context) (string, error)
}

func (a *api) routes(r *web.Router) {
	r.HandleFunc("GET /catalog/products", a.products)
	r.HandleFunc("GET /catalog/stats", a.stats)
	r.HandleFunc("GET /catalog/status", a.statusHandler)
	r.HandleFunc("POST /catalog/rebuild", a.rebuildHandler)
}

func (a *api) products(w http.ResponseWriter, r *http.Request) {
	products, err := a.queries.Products(r.Context(), r.URL.Query().Get("state"))
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, products)
}

func (a *api) stats(w http.ResponseWriter, r *http.Request) {
	stats, err := a.queries.Stats(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, stats)
}

// statusHandler is the runtime's status: the worker's (projection.Status)
// or the in-memory view's, with the contract check's count.
func (a *api) statusHandler(w http.ResponseWriter, r *http.Request) {
	st, err := a.status(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	web.WriteJSON(w, http.StatusOK, st)
}

func (a *api) rebuildHandler(w http.ResponseWriter, r *http.Request) {
	id, err := a.rebuild(r.Context())
	if err != nil {
		web.WriteError(w, r, err)
		return
	}
	w.Header().Set("Location", "/catalog/status")
	web.WriteJSON(w, http.StatusAccepted, map[string]string{"replay_id": id})
}
