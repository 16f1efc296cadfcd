package membroker

import (
	"fmt"
	"log/slog"
)

// Defaults of Config, RabbitMQ's own.
const (
	DefaultChannelMax      = 2047
	DefaultMaxMessageBytes = 128 << 20
)

// Config tunes a Broker. The zero value is ready to use.
type Config struct {
	// ChannelMax bounds the open channels of one connection, like
	// RabbitMQ's channel_max (a leak shows up as an error, not as memory).
	// Default 2047, at most 65535.
	ChannelMax int
	// MaxMessageBytes bounds a message body, like RabbitMQ's
	// max_message_size: a larger publish closes the channel with 406.
	// Default 128 MiB.
	MaxMessageBytes int
	// Logger gets what RabbitMQ would log: messages dropped because their
	// dead-letter or alternate exchange is missing. Default slog.Default().
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.ChannelMax == 0 {
		c.ChannelMax = DefaultChannelMax
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = DefaultMaxMessageBytes
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return c
}

// Validate reports a setting out of range; zero values mean the default.
func (c Config) Validate() error {
	if c.ChannelMax < 0 || c.ChannelMax > 65535 {
		return fmt.Errorf("membroker: ChannelMax %d is outside 0..65535", c.ChannelMax)
	}
	if c.MaxMessageBytes < 0 {
		return fmt.Errorf("membroker: MaxMessageBytes %d is negative", c.MaxMessageBytes)
	}
	return nil
}
