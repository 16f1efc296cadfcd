package membroker

import (
	"errors"
	"fmt"

	amqp091 "github.com/rabbitmq/amqp091-go"
)

// ErrBrokerClosed is returned by Dial after Close.
var ErrBrokerClosed = errors.New("membroker: broker closed")

var codeNames = map[int]string{
	amqp091.ConnectionForced:   "CONNECTION_FORCED",
	amqp091.AccessRefused:      "ACCESS_REFUSED",
	amqp091.NotFound:           "NOT_FOUND",
	amqp091.ResourceLocked:     "RESOURCE_LOCKED",
	amqp091.PreconditionFailed: "PRECONDITION_FAILED",
	amqp091.CommandInvalid:     "COMMAND_INVALID",
	amqp091.NotAllowed:         "NOT_ALLOWED",
	amqp091.NotImplemented:     "NOT_IMPLEMENTED",
}

// exception is the error RabbitMQ raises, worded as RabbitMQ words it
// ("NOT_FOUND - no queue 'q' in vhost '/'"), so logs read the same on both
// transports.
func exception(code int, format string, args ...any) *amqp091.Error {
	return &amqp091.Error{
		Code:    code,
		Reason:  codeNames[code] + " - " + fmt.Sprintf(format, args...),
		Server:  true,
		Recover: !isHard(code),
	}
}

// isHard reports whether code is a connection exception: it closes the
// connection, not only the channel.
func isHard(code int) bool {
	switch code {
	case amqp091.ContentTooLarge, amqp091.NoRoute, amqp091.NoConsumers,
		amqp091.AccessRefused, amqp091.NotFound, amqp091.ResourceLocked, amqp091.PreconditionFailed:
		return false
	}
	return true
}

func errNoQueue(name string) *amqp091.Error {
	return exception(amqp091.NotFound, "no queue '%s' in vhost '/'", name)
}

func errNoExchange(name string) *amqp091.Error {
	return exception(amqp091.NotFound, "no exchange '%s' in vhost '/'", name)
}

func errDefaultExchange() *amqp091.Error {
	return exception(amqp091.AccessRefused, "operation not permitted on the default exchange")
}

func errLocked(queue string) *amqp091.Error {
	return exception(amqp091.ResourceLocked, "cannot obtain exclusive access to locked queue '%s' in vhost '/'. "+
		"It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.", queue)
}

func errInequivalent(what, name, arg string, received, current any) *amqp091.Error {
	return exception(amqp091.PreconditionFailed, "inequivalent arg '%s' for %s '%s' in vhost '/': received '%v' but current is '%v'",
		arg, what, name, received, current)
}
