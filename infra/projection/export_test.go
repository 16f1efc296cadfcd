package projection

// Counters of this process, for tests that must wait for a retry or a
// reconnect to have happened.

func (w *Worker) RetriesForTest() int64      { return w.retries.Load() }
func (w *Worker) ReconnectsForTest() int64   { return w.reconnects.Load() }
func (w *Worker) StaleDroppedForTest() int64 { return w.staleDropped.Load() }
