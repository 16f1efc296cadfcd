package main

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/statemill/statemill/infra/sandbox"
)

// While four clients send commands, POST /catalog/rebuild: every read during
// the rebuild answers with the full product list, and afterwards the catalog
// equals the write model.
func TestRebuildUnderLoad(t *testing.T) {
	t.Parallel()
	e := newEnv(t)
	ids := e.createProducts(t, "load", 40)
	base, _ := e.catalog(sandbox.Name("cat"), false)
	waitRebuilt(t, base, 40+countInStock(40))
	waitConverged(t, e, base, 30*time.Second)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var sent atomic.Int64
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 11))
			for {
				select {
				case <-stop:
					return
				default:
				}
				id := ids[rng.IntN(len(ids))]
				n := 1 + rng.IntN(4)
				if rng.IntN(2) == 0 {
					n = -n
				}
				call(t, "PUT", e.products+"/api/products/"+id, fmt.Sprintf(`{"adjust_inventory":%d}`, n), nil)
				sent.Add(1)
			}
		}(uint64(w))
	}
	eventually(t, 10*time.Second, "load running", func() bool { return sent.Load() > 50 })

	var accepted struct {
		ReplayID string `json:"replay_id"`
	}
	if status := call(t, "POST", base+"/catalog/rebuild", "", &accepted); status != http.StatusAccepted || accepted.ReplayID == "" {
		t.Fatalf("POST /catalog/rebuild: %d %+v", status, accepted)
	}
	if status := call(t, "POST", base+"/catalog/rebuild", "", nil); status != http.StatusConflict {
		t.Fatalf("a second rebuild while one runs: %d, want 409", status)
	}
	reads := 0
	var st struct {
		Rebuild struct {
			State    string `json:"state"`
			ReplayID string `json:"replay_id"`
			Error    string `json:"error"`
		} `json:"rebuild"`
	}
	eventually(t, 60*time.Second, "rebuild completed", func() bool {
		got, status := catalogModel(t, base)
		if status != http.StatusOK || len(got) != len(ids) {
			t.Fatalf("a read during the rebuild returned %d with %d of %d products", status, len(got), len(ids))
		}
		reads++
		call(t, "GET", base+"/catalog/status", "", &st)
		if st.Rebuild.State == "failed" {
			t.Fatalf("rebuild failed: %s", st.Rebuild.Error)
		}
		return st.Rebuild.State == "completed" && st.Rebuild.ReplayID == accepted.ReplayID
	})
	close(stop)
	wg.Wait()
	t.Logf("%d reads during the rebuild, %d commands sent", reads, sent.Load())
	waitConverged(t, e, base, 60*time.Second)
}

// countInStock is how many of createProducts' n products got initial
// inventory (a second transition each).
func countInStock(n int) int64 {
	c := int64(0)
	for i := 0; i < n; i++ {
		if i%3 > 0 {
			c++
		}
	}
	return c
}
