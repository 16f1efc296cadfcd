package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	amqp091 "github.com/rabbitmq/amqp091-go"
)

// row is a product as the convergence check compares it.
type row struct {
	ID        string `json:"id"`
	State     string `json:"state"`
	Inventory int64  `json:"inventory"`
	Version   int64  `json:"version"`
}

// checksum digests rows sorted by id: two models converged when their
// checksums are equal.
func checksum(rows []row) string {
	slices.SortFunc(rows, func(a, b row) int { return strings.Compare(a.ID, b.ID) })
	h := sha256.New()
	for _, r := range rows {
		fmt.Fprintf(h, "%s|%s|%d|%d\n", r.ID, r.State, r.Inventory, r.Version)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// writeModel reads the products table of the write side.
func writeModel(ctx context.Context, dbURL string) ([]row, error) {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return nil, fmt.Errorf("write model: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, `SELECT id::text, state, inventory, version FROM products`)
	if err != nil {
		return nil, fmt.Errorf("write model: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (row, error) {
		var p row
		err := r.Scan(&p.ID, &p.State, &p.Inventory, &p.Version)
		return p, err
	})
	if err != nil {
		return nil, fmt.Errorf("write model: %w", err)
	}
	return out, nil
}

// getJSON decodes the JSON answer of a GET into out.
func getJSON(ctx context.Context, url string, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return err
	}
	if res.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %d %s", url, res.StatusCode, strings.TrimSpace(string(b)))
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("GET %s: %w", url, err)
	}
	return nil
}

// catalogModel reads a catalog's read model through its API.
func catalogModel(ctx context.Context, base string) ([]row, error) {
	var rows []row
	if err := getJSON(ctx, base+"/catalog/products", &rows); err != nil {
		return nil, fmt.Errorf("catalog model: %w", err)
	}
	return rows, nil
}

// catalogStatus is the part of GET /catalog/status the suite reads.
type catalogStatus struct {
	Applied      int64 `json:"applied"`
	LagMessages  int64 `json:"lag_messages"`
	DeadLettered int64 `json:"dead_lettered"`
	Connected    bool  `json:"connected"`
	Rebuild      struct {
		State    string `json:"state"`
		ReplayID string `json:"replay_id"`
		Expected int64  `json:"expected"`
		Received int64  `json:"received"`
		Error    string `json:"error"`
	} `json:"rebuild"`
}

func getStatus(ctx context.Context, base string) (catalogStatus, error) {
	var st catalogStatus
	err := getJSON(ctx, base+"/catalog/status", &st)
	return st, err
}

// outboxPending reads statemill_outbox_pending from the products
// service's metrics (-1 when it cannot be read).
func outboxPending(ctx context.Context, base string) int64 {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return -1
	}
	defer res.Body.Close()
	sc := bufio.NewScanner(res.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "statemill_outbox_pending "); ok {
			f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err != nil {
				return -1
			}
			return int64(f)
		}
	}
	return -1
}

// historyRow is one transition of the write side's history.
type historyRow struct {
	eventID, entityID, correlationID string
	version                          int64
}

func readHistory(ctx context.Context, dbURL string) ([]historyRow, error) {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	rows, err := conn.Query(ctx, `SELECT event_id::text, entity_id::text, version, correlation_id FROM history WHERE entity_type = 'product'`)
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (historyRow, error) {
		var h historyRow
		err := r.Scan(&h.eventID, &h.entityID, &h.version, &h.correlationID)
		return h, err
	})
	if err != nil {
		return nil, fmt.Errorf("history: %w", err)
	}
	return out, nil
}

// auditQueue receives a copy of every live event (bound to product.#): what
// the broker accepted from the relay, counted independently of any
// projection.
const auditQueue = "faults.audit"

// poisonPrefix marks the message ids of injected poison, which the audit
// queue receives too.
const poisonPrefix = "poison-"

// audit is what the audit queue held.
type audit struct {
	ids        map[string]int // event id → deliveries
	deliveries int64
	poison     int64
	noID       int64
}

// drainAudit consumes the audit queue to its end. It runs after the system
// went quiet, so the queue's message count is final.
func drainAudit(ctx context.Context, amqpURL string) (audit, error) {
	a := audit{ids: map[string]int{}}
	conn, err := amqp091.Dial(amqpURL)
	if err != nil {
		return a, fmt.Errorf("audit: %w", err)
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return a, fmt.Errorf("audit: %w", err)
	}
	q, err := ch.QueueDeclarePassive(auditQueue, true, false, false, false, nil)
	if err != nil {
		return a, fmt.Errorf("audit: %w", err)
	}
	if err := ch.Qos(1000, 0, false); err != nil {
		return a, fmt.Errorf("audit: %w", err)
	}
	deliveries, err := ch.Consume(auditQueue, "", false, true, false, false, nil)
	if err != nil {
		return a, fmt.Errorf("audit: %w", err)
	}
	idle := time.NewTimer(10 * time.Second)
	defer idle.Stop()
	for n := 0; n < q.Messages; n++ {
		select {
		case <-ctx.Done():
			return a, ctx.Err()
		case <-idle.C:
			return a, fmt.Errorf("audit: %d of %d messages received, then nothing for 10s", n, q.Messages)
		case d, ok := <-deliveries:
			if !ok {
				return a, errors.New("audit: the channel closed while draining")
			}
			idle.Reset(10 * time.Second)
			switch {
			case strings.HasPrefix(d.MessageId, poisonPrefix):
				a.poison++
			case d.MessageId == "":
				a.noID++
			default:
				a.ids[d.MessageId]++
				a.deliveries++
			}
			if (n+1)%500 == 0 || n+1 == q.Messages {
				if err := d.Ack(true); err != nil {
					return a, fmt.Errorf("audit: ack: %w", err)
				}
			}
		}
	}
	return a, nil
}

// queueDepth is the number of messages ready in queue (-1 when it cannot
// be read).
func queueDepth(amqpURL, queue string) int64 {
	conn, err := amqp091.DialConfig(amqpURL, amqp091.Config{Dial: amqp091.DefaultDial(5 * time.Second)})
	if err != nil {
		return -1
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return -1
	}
	q, err := ch.QueueDeclarePassive(queue, true, false, false, false, nil)
	if err != nil {
		return -1
	}
	return int64(q.Messages)
}

// appliedAuditSQL installs, in the catalog's database, a trigger that
// records every change the catalog makes to its read model: an event
// applied twice to a generation (the same version written twice) or an
// older event applied over a newer one shows up there, however the
// runtime's counters are kept. Deleting a row (a generation cleared) starts
// a new epoch for that row, so a generation number used again after a
// dropped rebuild is not a duplicate.
var appliedAuditSQL = []string{
	`CREATE TABLE public.faults_applied (
		seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
		generation bigint NOT NULL, id uuid NOT NULL,
		old_version bigint, new_version bigint, deleted boolean NOT NULL DEFAULT false)`,
	`CREATE FUNCTION public.faults_audit() RETURNS trigger LANGUAGE plpgsql AS $$
	BEGIN
		IF TG_OP = 'DELETE' THEN
			INSERT INTO public.faults_applied (generation, id, old_version, deleted) VALUES (OLD.generation, OLD.id, OLD.version, true);
		ELSIF TG_OP = 'UPDATE' THEN
			INSERT INTO public.faults_applied (generation, id, old_version, new_version) VALUES (NEW.generation, NEW.id, OLD.version, NEW.version);
		ELSE
			INSERT INTO public.faults_applied (generation, id, new_version) VALUES (NEW.generation, NEW.id, NEW.version);
		END IF;
		RETURN NULL;
	END $$`,
	`CREATE TRIGGER faults_audit AFTER INSERT OR UPDATE OR DELETE ON catalog.products
		FOR EACH ROW EXECUTE FUNCTION public.faults_audit()`,
}

// appliedTwice counts the writes to the catalog's read model that wrote a
// version the row had already had in the same generation and epoch
// (duplicates applied), and those that wrote an older version over a newer
// one (regressions).
func appliedTwice(ctx context.Context, dbURL string) (duplicates, regressions, writes int64, err error) {
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("applied audit: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	err = conn.QueryRow(ctx, `
		WITH a AS (
			SELECT generation, id, new_version, old_version, deleted,
			       count(*) FILTER (WHERE deleted) OVER (PARTITION BY generation, id ORDER BY seq) AS epoch
			FROM public.faults_applied)
		SELECT
			(SELECT coalesce(sum(n - 1), 0)::bigint FROM (
				SELECT count(*) AS n FROM a WHERE NOT deleted
				GROUP BY generation, id, epoch, new_version HAVING count(*) > 1) d),
			(SELECT count(*) FROM a WHERE NOT deleted AND old_version IS NOT NULL AND new_version < old_version),
			(SELECT count(*) FROM a WHERE NOT deleted)`).Scan(&duplicates, &regressions, &writes)
	if err != nil {
		return 0, 0, 0, fmt.Errorf("applied audit: %w", err)
	}
	return duplicates, regressions, writes, nil
}
