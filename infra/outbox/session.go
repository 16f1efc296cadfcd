package outbox

import (
	"fmt"

	"github.com/statemill/statemill/infra/broker"
)

// brokerSession is a relay's publishing connection and its confirming
// channel, opened when needed and dropped whole after any failure: after a
// nack, a closed channel or a missed deadline the relay cannot know which
// messages arrived, so it starts over on a new connection, which also
// clears one left blocked or half-broken.
type brokerSession struct {
	dial   broker.Dialer
	window int

	conn    broker.Conn
	pub     *broker.ConfirmPublisher
	dialled bool // a connection existed before: the next dial is a reconnect
}

// ensure opens the connection and channel when there are none; reconnect
// reports a dial that replaced an earlier connection.
func (s *brokerSession) ensure() (reconnect bool, err error) {
	if s.pub != nil && s.conn != nil && !s.conn.IsClosed() {
		return false, nil
	}
	s.drop()
	conn, err := s.dial("statemill-outbox-relay")
	if err != nil {
		return false, fmt.Errorf("outbox: connect to the broker: %w", err)
	}
	reconnect, s.dialled = s.dialled, true
	pub, err := broker.NewConfirmPublisher(conn, s.window)
	if err != nil {
		_ = conn.Close()
		return reconnect, fmt.Errorf("outbox: %w", err)
	}
	s.conn, s.pub = conn, pub
	return reconnect, nil
}

// drop closes the channel and the connection.
func (s *brokerSession) drop() {
	if s.pub != nil {
		_ = s.pub.Close()
		s.pub = nil
	}
	if s.conn != nil {
		_ = s.conn.Close()
		s.conn = nil
	}
}
