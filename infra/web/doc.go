// Package web holds the HTTP plumbing every statemill service shares: error
// replies as RFC 9457 problem details, strict JSON decoding, request ids,
// logging, metrics, panic recovery, a ServeMux wrapper whose own 404/405
// replies are problems too, ETag/If-Match helpers, paging, a hardened
// http.Server and a health handler.
//
// It is generic framework code: it knows apperr codes and HTTP, nothing about
// any entity or service. Handlers stay plain net/http handlers; this package
// only removes the parts each of them would otherwise get subtly wrong.
//
// A typical stack, outermost first:
//
//	h := web.Chain(router, web.RequestID, web.Log, metrics.Middleware, web.Recover)
//	srv := web.NewServer(addr, h)
//
// RequestID comes first so that every later log line carries the id; Recover
// comes last so that a panic is turned into a 500 that Log and Metrics record.
package web
