// Package orderexample_test proves that the framework is generic: a second
// entity, "order", with its own small state machine, goes through the write
// path (store, history, outbox), the relay, a projection and a replay with
// nothing in infra/ knowing about it. It has tests only.
package orderexample_test
