# statemill: everyday commands. `make test` is what CI runs (.ci/run).
GO ?= go

.PHONY: all run run-services test fmt-check vet tidy-check bench bench-short lint fuzz up

all: test

# Local defaults for `make run-services`: the machine's PostgreSQL and RabbitMQ.
DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/statemill?sslmode=disable
AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672/
export DATABASE_URL AMQP_URL

## run: the whole system in one process on :8080, embedded (SQLite in var/, an in-process broker): nothing to install
run:
	env -u DATABASE_URL -u AMQP_URL $(GO) run ./services/all

## run-services: the products service (:8080), the catalog (:8081) and the live page (:8082) as separate processes against local PostgreSQL and RabbitMQ; Ctrl-C stops them
run-services:
	@psql "$(subst /statemill?,/postgres?,$(DATABASE_URL))" -Atqc "SELECT 1 FROM pg_database WHERE datname = 'statemill'" | grep -q 1 || \
		psql "$(subst /statemill?,/postgres?,$(DATABASE_URL))" -qc "CREATE DATABASE statemill"
	$(GO) build -o bin/ ./services/products ./services/catalog ./services/ui
	@trap 'kill 0' INT TERM EXIT; \
		HTTP_ADDR=:8080 bin/products & \
		HTTP_ADDR=:8081 bin/catalog & \
		HTTP_ADDR=:8082 bin/ui & \
		wait

## test: formatting, vet, tidy go.mod, then every test with the race detector
test: fmt-check vet tidy-check
	$(GO) test -race -count=1 -timeout 20m ./...

fmt-check:
	@out=$$(gofmt -l .) || exit 1; \
	if [ -n "$$out" ]; then \
		echo "gofmt: these files are not formatted (run gofmt -w):"; \
		echo "$$out"; \
		exit 1; \
	fi

vet:
	$(GO) vet ./...

tidy-check:
	$(GO) mod tidy -diff

## bench: baselines and system figures against the local PostgreSQL and RabbitMQ (several minutes); table on stdout, JSON to BENCH_OUT (default bench-results.json)
bench:
	$(GO) run ./services/bench

## bench-short: the same with tiny counts, under a minute: a smoke test, its figures mean little
bench-short:
	$(GO) run ./services/bench -short

## lint: formatting and vet only
lint: fmt-check vet

## fuzz: every fuzz target for 20 s each (state machine, event decoding, command decoding)
fuzz:
	$(GO) test -run '^$$' -fuzz=FuzzFire -fuzztime=20s ./infra/statemachine
	$(GO) test -run '^$$' -fuzz=FuzzDecode -fuzztime=20s ./infra/envelope
	$(GO) test -run '^$$' -fuzz=FuzzCreateProduct -fuzztime=20s ./commands
	$(GO) test -run '^$$' -fuzz=FuzzAdjustInventory -fuzztime=20s ./commands

## up: the whole system in containers
up:
	docker compose up --build

## faults: the fault suite: 7 scenarios (services killed, broker and database restarted, a long
## transaction, poison, a rebuild) x 10,000 commands, the services as processes against a PostgreSQL
## cluster and a RabbitMQ node of its own (never the shared ones); about 10 min; JSON to $(FAULTS_OUT)
FAULTS_OUT ?= faults-results.json
.PHONY: faults faults-short
faults:
	$(GO) run ./services/faults -out $(FAULTS_OUT)

## faults-short: the short fault suite (1,000 commands per scenario), the broker least-privilege
## test and the services running as the least-privilege users (AMQP_DECLARE=passive), built with
## the tag `faults`; CI runs it as its own step after `make test`
faults-short:
	$(GO) test -tags faults -race -count=1 -timeout 20m -v \
		-run '^(TestFaultsShort|TestLeastPrivilege|TestServicesUnderLeastPrivilege)$$' ./services/faults
