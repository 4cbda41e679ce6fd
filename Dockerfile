# syntax=docker/dockerfile:1
# Conveyor's image: one `conveyor` binary (dispatcher, worker, api, migrate, …) and `conveyorctl`.
#
#   docker build -t conveyor .
#   docker run --rm conveyor --help
#
# The build stage runs scripts/build-release.sh, the same script CI runs, so the steps that make
# the binaries are checked on every change even where no Docker engine runs.

ARG SWIFT_VERSION=6.3
FROM swift:${SWIFT_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq-dev librabbitmq-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The manifest first: dependencies resolve in a layer of their own.
COPY Package.swift ./
RUN swift package resolve
COPY Sources Sources
COPY Tests Tests
COPY Examples Examples
COPY scripts/build-release.sh scripts/
RUN scripts/build-release.sh /out

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 librabbitmq4 ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --gid 0 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin conveyor
# Binaries and their resource bundles (migrations, OpenAPI, dashboard) together, read-only.
COPY --from=build /out/ /opt/conveyor/
COPY config/ /etc/conveyor/
ENV PATH=/opt/conveyor:$PATH \
    CONVEYOR_CONFIG_DIR=/etc/conveyor \
    CONVEYOR_LOG_FORMAT=json
# Nothing is written to the image's filesystem: it runs with a read-only root.
USER 10001:0
EXPOSE 8080 9090 9091
ENTRYPOINT ["conveyor"]
CMD ["--help"]
