package handlers

import (
	"errors"
	"fmt"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/commandbus"
	"github.com/statemill/statemill/infra/statemachine"
)

// Register puts every Product command handler on bus.
func Register(bus *commandbus.Bus, repo Repository) error {
	return errors.Join(
		commandbus.Handle(bus, CreateProductHandler{repo}.Handle),
		commandbus.Handle(bus, AdjustInventoryHandler{repo}.Handle),
		commandbus.Handle(bus, DiscontinueProductHandler{repo}.Handle),
	)
}

// checkVersion enforces If-Match: when the caller names a version, the
// product must still be at it.
func checkVersion(p *Product, ifVersion int64) error {
	if ifVersion > 0 && p.Version != ifVersion {
		return apperr.Errorf(apperr.PreconditionFailed, "product %s is at version %d, not %d", p.ID, p.Version, ifVersion)
	}
	return nil
}

// conflictIfNotAllowed turns an impossible transition into a 409.
func conflictIfNotAllowed(err error) error {
	var te *statemachine.TransitionError
	if errors.As(err, &te) {
		return apperr.Wrap(apperr.Conflict, err, fmt.Sprintf("cannot %s a product in state %s", te.Event, te.From))
	}
	return err
}
