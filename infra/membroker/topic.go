package membroker

import "strings"

// splitKey splits a routing or binding key into words as RabbitMQ does:
// on every '.', empty words kept ("a..b" is three words, "." two), and ""
// is no word at all (so "*" does not match it, "#" does).
func splitKey(key string) []string {
	if key == "" {
		return nil
	}
	return strings.Split(key, ".")
}

// topicMatch reports whether the binding pattern matches the routing key,
// both split by splitKey: '*' matches exactly one word, '#' zero or more.
// Dynamic programming over (pattern word, key word) keeps a pattern full of
// '#' linear in the key instead of exponential.
func topicMatch(pattern, key []string) bool {
	m := len(key)
	// next[j]: pattern[i+1:] matches key[j:]; starting past the end of the
	// pattern, only the end of the key matches.
	next := make([]bool, m+1)
	cur := make([]bool, m+1)
	next[m] = true
	for i := len(pattern) - 1; i >= 0; i-- {
		w := pattern[i]
		for j := m; j >= 0; j-- {
			switch {
			case w == "#":
				cur[j] = next[j] || (j < m && cur[j+1])
			case j < m && (w == "*" || w == key[j]):
				cur[j] = next[j+1]
			default:
				cur[j] = false
			}
		}
		next, cur = cur, next
	}
	return next[0]
}
