# One image per service: docker build --build-arg SERVICE=products .
# (docker-compose.yml passes SERVICE for each service.)

FROM golang:1.26 AS build
ARG SERVICE
RUN test -n "$SERVICE" || { echo "build arg SERVICE is required (a folder under services/)" >&2; exit 1; }
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \
    go mod download
COPY . .
RUN --mount=type=cache,target=/go/pkg/mod \
    --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /app ./services/${SERVICE}

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /app /app
USER nonroot:nonroot
ENTRYPOINT ["/app"]
