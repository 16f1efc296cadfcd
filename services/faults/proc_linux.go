package main

import (
	"os/exec"
	"syscall"
)

// setProcAttr puts a child in a process group of its own, so a Ctrl-C in the
// terminal reaches only the suite, which then stops everything in order; and
// asks the kernel to kill the child should the suite die without cleaning
// up, so no service outlives the run.
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// setGroupAttr puts a helper (pg_ctl, rabbitmqctl) in a process group of its
// own without tying its life to the suite: the servers those helpers start
// must outlive them, and the suite stops the servers itself.
func setGroupAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
}
