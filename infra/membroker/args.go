package membroker

import (
	"fmt"
	"reflect"
	"time"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// queueArgs are the queue arguments membroker acts on.
type queueArgs struct {
	dlx     string
	hasDLX  bool
	dlrk    string
	hasDLRK bool
	expires time.Duration
}

// equivalenceArgs are the queue arguments RabbitMQ compares on a redeclare
// (others, unknown ones included, may differ). x-queue-type is compared
// with "classic" standing for its absence, as RabbitMQ 3.10 does.
var equivalenceArgs = []string{
	"x-expires", "x-message-ttl", "x-dead-letter-exchange", "x-dead-letter-routing-key",
	"x-max-length", "x-max-length-bytes", "x-max-in-memory-length", "x-max-in-memory-bytes",
	"x-max-priority", "x-overflow", "x-queue-mode", "x-single-active-consumer", "x-queue-type",
	"x-quorum-initial-group-size", "x-delivery-limit",
}

// unimplementedArgs change what a queue does and are not implemented:
// refused, so that a component never silently gets other semantics than on
// RabbitMQ.
var unimplementedArgs = []string{
	"x-message-ttl", "x-max-length", "x-max-length-bytes", "x-overflow", "x-max-priority", "x-delivery-limit",
}

// parseQueueArgs validates a new queue's arguments as RabbitMQ does.
func parseQueueArgs(queue string, args amqp091.Table) (queueArgs, error) {
	var qa queueArgs
	for _, k := range unimplementedArgs {
		if _, ok := args[k]; ok {
			return qa, exception(amqp091.PreconditionFailed, "membroker does not implement arg '%s' (queue '%s')", k, queue)
		}
	}
	if v, ok := args["x-single-active-consumer"]; ok && v != false {
		return qa, exception(amqp091.PreconditionFailed, "membroker does not implement arg 'x-single-active-consumer' (queue '%s')", queue)
	}
	if v, ok := args["x-queue-type"]; ok && v != "classic" {
		return qa, exception(amqp091.PreconditionFailed, "membroker implements only classic queues, not x-queue-type '%v' (queue '%s')", v, queue)
	}
	if v, ok := args["x-dead-letter-exchange"]; ok {
		s, isString := v.(string)
		if !isString {
			return qa, exception(amqp091.PreconditionFailed, "invalid type '%s' for arg 'x-dead-letter-exchange' in queue '%s' in vhost '/'", typeName(v), queue)
		}
		qa.dlx, qa.hasDLX = s, true
	}
	if v, ok := args["x-dead-letter-routing-key"]; ok {
		s, isString := v.(string)
		if !isString {
			return qa, exception(amqp091.PreconditionFailed, "invalid type '%s' for arg 'x-dead-letter-routing-key' in queue '%s' in vhost '/'", typeName(v), queue)
		}
		if !qa.hasDLX {
			return qa, exception(amqp091.PreconditionFailed, "invalid arg 'x-dead-letter-routing-key' for queue '%s' in vhost '/': routing_key_but_no_dlx_defined", queue)
		}
		qa.dlrk, qa.hasDLRK = s, true
	}
	if v, ok := args["x-expires"]; ok {
		n, isInt := toInt64(v)
		switch {
		case !isInt:
			return qa, exception(amqp091.PreconditionFailed, "invalid arg 'x-expires' for queue '%s' in vhost '/': \"expected integer, got %s\"", queue, typeName(v))
		case n == 0:
			return qa, exception(amqp091.PreconditionFailed, "invalid arg 'x-expires' for queue '%s' in vhost '/': {value_zero,0}", queue)
		case n < 0:
			return qa, exception(amqp091.PreconditionFailed, "invalid arg 'x-expires' for queue '%s' in vhost '/': {value_negative,%d}", queue, n)
		}
		qa.expires = time.Duration(n) * time.Millisecond
	}
	return qa, nil
}

// equivalentQueue checks a redeclare against the queue as RabbitMQ does:
// durable, auto_delete, the compared arguments, then exclusivity.
func (q *queue) equivalent(durable, autoDelete, exclusive bool, args amqp091.Table, c *conn) error {
	if durable != q.durable {
		return errInequivalent("queue", q.name, "durable", durable, q.durable)
	}
	if autoDelete != q.autoDelete {
		return errInequivalent("queue", q.name, "auto_delete", autoDelete, q.autoDelete)
	}
	for _, k := range equivalenceArgs {
		if err := equivalentArg("queue", q.name, k, q.args, args); err != nil {
			return err
		}
	}
	if exclusive != (q.owner != nil) || (q.owner != nil && q.owner != c) {
		return errLocked(q.name)
	}
	return nil
}

// equivalentExchange checks a redeclare against the exchange: kind, flags
// and alternate-exchange, the one argument RabbitMQ compares.
func (x *exchange) equivalent(kind string, durable, autoDelete, internal bool, args amqp091.Table) error {
	switch {
	case kind != x.kind:
		return errInequivalent("exchange", x.name, "type", kind, x.kind)
	case durable != x.durable:
		return errInequivalent("exchange", x.name, "durable", durable, x.durable)
	case autoDelete != x.autoDelete:
		return errInequivalent("exchange", x.name, "auto_delete", autoDelete, x.autoDelete)
	case internal != x.internal:
		return errInequivalent("exchange", x.name, "internal", internal, x.internal)
	}
	return equivalentArg("exchange", x.name, "alternate-exchange", x.args, args)
}

func equivalentArg(what, name, key string, current, received amqp091.Table) error {
	cur, hasCur := current[key]
	rec, hasRec := received[key]
	if key == "x-queue-type" {
		cur, hasCur = withDefault(cur, hasCur, "classic")
		rec, hasRec = withDefault(rec, hasRec, "classic")
	}
	switch {
	case !hasCur && !hasRec:
		return nil
	case !hasCur:
		return exception(amqp091.PreconditionFailed, "inequivalent arg '%s' for %s '%s' in vhost '/': received the value '%v' of type '%s' but current is none",
			key, what, name, rec, typeName(rec))
	case !hasRec:
		return exception(amqp091.PreconditionFailed, "inequivalent arg '%s' for %s '%s' in vhost '/': received none but current is the value '%v' of type '%s'",
			key, what, name, cur, typeName(cur))
	case !sameValue(cur, rec):
		return errInequivalent(what, name, key, rec, cur)
	}
	return nil
}

func withDefault(v any, ok bool, def any) (any, bool) {
	if !ok {
		return def, true
	}
	return v, true
}

// sameValue compares argument values as RabbitMQ does: integers of any
// width are one type.
func sameValue(a, b any) bool {
	if x, ok := toInt64(a); ok {
		y, ok := toInt64(b)
		return ok && x == y
	}
	return reflect.DeepEqual(a, b)
}

func toInt64(v any) (int64, bool) {
	switch n := v.(type) {
	case int:
		return int64(n), true
	case int8:
		return int64(n), true
	case int16:
		return int64(n), true
	case int32:
		return int64(n), true
	case int64:
		return n, true
	case uint8:
		return int64(n), true
	}
	return 0, false
}

// typeName is the AMQP field type RabbitMQ names in its messages.
func typeName(v any) string {
	switch v.(type) {
	case string:
		return "longstr"
	case bool:
		return "bool"
	case int8:
		return "byte"
	case int16:
		return "short"
	case int, int32:
		return "signedint"
	case int64:
		return "long"
	case float32:
		return "float"
	case float64:
		return "double"
	case amqp091.Table:
		return "table"
	case []any:
		return "array"
	case time.Time:
		return "timestamp"
	case []byte:
		return "binary"
	}
	return fmt.Sprintf("%T", v)
}
