# Postern container image.
#
# Build:  docker build -t postern .        (or: buildah bud -t postern .)
# Run:    docker run -p 993:9993 -p 143:9143 \
#           -v "$PWD/postern.yaml:/etc/postern/postern.yaml:ro" postern
#
# Two stages: the binary is compiled from source in a Rust image, then
# copied alone onto distroless "cc" (glibc, libgcc, CA certificates; no
# shell, no package manager) and run as uid 65532. Inside the container
# Postern listens on unprivileged ports (IMAPS 9993, IMAP 9143, metrics
# 9090, and where configured POP3S 9995 and POP3 9110); the Kubernetes
# Service or `docker run -p` maps 993, 143 (995, 110) to them.
#
# Postern is PID 1: it handles SIGTERM (drain, then exit 0), SIGINT and
# SIGHUP (reload) itself and starts no child processes, so no init is needed.
# It writes nothing outside the self-signed certificate directory (/tmp in
# the shipped configuration, used only when no certificate is configured),
# so a read-only root filesystem works (docker run --read-only --tmpfs /tmp;
# the Helm chart mounts an emptyDir); Kubernetes probes /healthz and
# /readyz, so the image has no HEALTHCHECK.
#
# Both base images are build arguments, so a build can use a mirror or
# locally made images (scripts/container-image does, with buildah).

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# The workspace manifests and every target cargo reads them for.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY bench/loadgen ./bench/loadgen
COPY bench/floor ./bench/floor
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin postern \
    && install -D -m 0755 target/release/postern /out/postern

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="Postern" \
      org.opencontainers.image.description="TLS-terminating IMAP proxy and load balancer with pre-authentication" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/postern /usr/local/bin/postern
COPY deploy/container/postern.yaml deploy/container/users.yaml /etc/postern/
USER 65532:65532
EXPOSE 9993 9143 9995 9110 9090
ENTRYPOINT ["/usr/local/bin/postern"]
CMD ["run", "--config", "/etc/postern/postern.yaml"]
