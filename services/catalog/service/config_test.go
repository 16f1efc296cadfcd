package service

import (
	"strings"
	"testing"
)

// AMQP_DECLARE chooses between declaring the broker topology and only
// checking it (passive, for least-privilege users); anything else stops
// the service at start.
func TestConfigDeclareMode(t *testing.T) {
	for _, c := range []struct {
		value   string
		passive bool
		err     string
	}{
		{"", false, ""},
		{"declare", false, ""},
		{"passive", true, ""},
		{"Passive", false, `AMQP_DECLARE: "Passive" is not a declare mode`},
		{"true", false, `AMQP_DECLARE: "true" is not a declare mode`},
	} {
		env := map[string]string{"DATABASE_URL": "postgres://x@localhost/x", "AMQP_DECLARE": c.value}
		cfg, err := ConfigFromEnv(func(k string) string { return env[k] })
		switch {
		case c.err != "":
			if err == nil || !strings.Contains(err.Error(), c.err) || !strings.Contains(err.Error(), `"passive"`) {
				t.Errorf("AMQP_DECLARE=%q: %v, want an error saying %q and naming the valid modes", c.value, err, c.err)
			}
		case err != nil:
			t.Errorf("AMQP_DECLARE=%q: %v", c.value, err)
		case cfg.Topology.Passive != c.passive:
			t.Errorf("AMQP_DECLARE=%q: Topology.Passive = %t, want %t", c.value, cfg.Topology.Passive, c.passive)
		}
	}
}
