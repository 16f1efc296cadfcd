package main

import (
	"os/exec"
	"syscall"
)

// setProcAttr puts a service in a process group of its own, so a Ctrl-C in
// the terminal reaches only the bench, which then stops the services in
// order and cleans up; and asks the kernel to send it SIGTERM should the
// bench die without cleaning up, so no service outlives the run.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
