//go:build !linux

package main

import "os/exec"

// setProcAttr does nothing off Linux. The bench reads /proc (listening
// ports, peak RSS) and so measures on Linux only; elsewhere it still builds.
func setProcAttr(*exec.Cmd) {}
