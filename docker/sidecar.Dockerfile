# syntax=docker/dockerfile:1
# chaperone-sidecar, built from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t chaperone-sidecar .
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
    cargo build --release --locked -p chaperone-sidecar --bin chaperone-sidecar \
    && install -D -m 0755 target/release/chaperone-sidecar /out/chaperone-sidecar

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="chaperone-sidecar" \
      org.opencontainers.image.description="The Chaperone sidecar: an MCP-aware proxy that enforces tool-call policy in agent pods." \
      org.opencontainers.image.source="https://github.com/chaperone-dev/chaperone" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/chaperone-sidecar /usr/local/bin/chaperone-sidecar
# distroless's nonroot user; the injected container's securityContext sets it too.
USER 65532:65532
# MCP proxy for the agent, inbound (delegation) port, admin (/metrics, /ready).
EXPOSE 15001 15006 15090
ENTRYPOINT ["/usr/local/bin/chaperone-sidecar"]
