-- +goose Up
-- Wakes an idle outbox relay (outbox.PipelinedRelay) with NOTIFY instead of
-- a tight poll.
--
-- A NOTIFY is not free: at commit, PostgreSQL serialises every transaction
-- that notified, cluster-wide, on one lock held until after the commit's WAL
-- flush (async.c, PreCommit_Notify), so notifying transactions lose group
-- commit. Measured here with pgbench on a command-shaped transaction at 4
-- clients, 10 interleaved pairs, an unconditional NOTIFY trigger gave 0.7x
-- the commit rate (median; 0.3x to 1.6x on a noisy box). So the trigger
-- notifies only while a relay has said it is asleep (waiting = true); a
-- relay with work polls and clears the flag, and commands under load pay
-- one index lookup.
--
-- The table is UNLOGGED: flipping the flag writes no WAL and so waits for no
-- flush. After a crash it is empty, and relays poll until they set it again.
CREATE UNLOGGED TABLE outbox_relay_wakeup (
    channel        text    NOT NULL, -- the messages table, and the NOTIFY channel
    consumer_group text    NOT NULL,
    waiting        boolean NOT NULL,
    PRIMARY KEY (channel, consumer_group)
);

-- Statement-level: one lookup per INSERT statement, and PostgreSQL folds
-- identical notifications of one transaction into one.
-- +goose StatementBegin
CREATE FUNCTION outbox_wake_relay() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM outbox_relay_wakeup WHERE channel = TG_TABLE_NAME AND waiting) THEN
        PERFORM pg_notify(TG_TABLE_NAME, '');
    END IF;
    RETURN NULL;
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER watermill_outbox_wake_relay AFTER INSERT ON watermill_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_wake_relay();

-- +goose Down
DROP TRIGGER watermill_outbox_wake_relay ON watermill_outbox;
DROP FUNCTION outbox_wake_relay();
DROP TABLE outbox_relay_wakeup;
