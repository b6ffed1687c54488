# syntax=docker/dockerfile:1
# chaperone-controller, built from the repository root:
#   docker build -f docker/controller.Dockerfile -t chaperone-controller .
#
# The builder is Debian bookworm so that the binary's glibc matches the
# distroless cc-debian12 runtime (glibc, libgcc, CA certificates; no shell, no
# package manager). The toolchain is the one rust-toolchain.toml pins.
FROM docker.io/library/rust:1.95.0-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target directory between builds; the
# binary is copied out of the cached target directory into the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p chaperone-controller --bin chaperone-controller \
    && install -D -m 0755 target/release/chaperone-controller /out/chaperone-controller

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="chaperone-controller" \
      org.opencontainers.image.description="The Chaperone controller: reconciles AgentIdentity, ToolPolicy and DelegationGrant, serves snapshots and the injection webhook." \
      org.opencontainers.image.source="https://github.com/chaperone-dev/chaperone" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/chaperone-controller /usr/local/bin/chaperone-controller
# distroless's nonroot user; the chart also sets runAsUser 65532.
USER 65532:65532
# gRPC snapshots (TLS), injection webhook (HTTPS), admin (/metrics, /healthz, /readyz).
EXPOSE 9090 8443 9091
ENTRYPOINT ["/usr/local/bin/chaperone-controller"]
