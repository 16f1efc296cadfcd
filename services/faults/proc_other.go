//go:build !linux

package main

import "os/exec"

// The suite drives Linux tools (runuser, /proc, the Debian layout of
// PostgreSQL and RabbitMQ); elsewhere it builds but children get no
// special attributes.
func setProcAttr(*exec.Cmd)  {}
func setGroupAttr(*exec.Cmd) {}
