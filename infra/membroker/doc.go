// Package membroker is the in-process message broker of statemill's embedded
// mode: the part of RabbitMQ that statemill uses, behind the same
// broker.Conn and broker.Channel as the real thing, so that the outbox relay,
// the projection workers and the replay responder run on it unchanged.
//
// What it does as RabbitMQ 3.10 does (the conformance suite in
// infra/broker/brokertest runs against both to keep it so):
//
//   - exchanges of kind topic, direct and fanout, the default exchange ""
//     and amq.direct, amq.fanout, amq.topic; topic matching word by word
//     ('*' one word, '#' zero or more, empty words count, the key "" has no
//     word); the alternate-exchange argument; internal and auto-delete
//     exchanges;
//   - queues, named or server-named ("amq.gen-..."), with bindings;
//     exclusive queues die with their connection, auto-delete queues with
//     their last consumer, x-expires queues after that long unused;
//   - competing consumers served round-robin, Qos prefetch per consumer or
//     per channel (global), exclusive consumers;
//   - ack, nack and reject (multiple too); a requeued message goes back to
//     its place and is redelivered with Redelivered set; a rejected one is
//     dead-lettered (x-dead-letter-exchange, x-dead-letter-routing-key) with
//     RabbitMQ's x-death and x-first-death-* headers, or dropped;
//   - a closed channel or connection requeues its unacknowledged messages;
//   - errors are *amqp091.Error with RabbitMQ's codes and texts: a channel
//     exception closes the channel (NotifyClose receivers get it, delivery
//     channels close), a connection exception the connection. As with
//     amqp091, methods that have no reply in AMQP (publish, ack, nack,
//     reject) report a refusal only by closing the channel;
//   - confirm mode, mandatory publishes returned through NotifyReturn;
//   - redeclaring with other flags or arguments fails with 406.
//
// Headers, timestamps and bodies reach consumers as they would over the
// wire: copied, int headers as int32, timestamps at second precision.
//
// Where it differs on purpose:
//
//   - It keeps nothing across restarts: queues live in memory only, durable
//     or not. In embedded mode the durable log is the outbox in the
//     database, which the relay re-sends from; the broker only has to be
//     right while the process runs.
//   - Queues are unbounded lists: a publisher never waits for a consumer
//     and there is no flow control, so memory is the limit.
//   - Confirms are immediate: Publish returns once the message is in every
//     queue it routes to, with its Confirmation already acked.
//   - Queue arguments whose absence would change behaviour and that it does
//     not implement (x-message-ttl, x-max-length, x-max-length-bytes,
//     x-overflow, x-max-priority, x-single-active-consumer, a queue type
//     other than classic) are refused with 406 rather than ignored; other
//     arguments are accepted and ignored, as RabbitMQ ignores unknown ones.
//     The headers exchange type, basic.get, transactions, per-message TTL
//     (Expiration is carried, not enforced), user-id checks and exchange to
//     exchange bindings are not implemented.
//
// Notification receivers (NotifyClose, NotifyReturn, NotifyCancel) are sent
// to with a blocking send, as amqp091 does: buffer them, or read them on
// another goroutine than the one calling into the channel.
package membroker
