# syntax=docker/dockerfile:1
# chaperonectl, built from the repository root:
#   docker build -f docker/chaperonectl.Dockerfile -t chaperone-chaperonectl .
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
    cargo build --release --locked -p chaperone-cli --bin chaperonectl \
    && install -D -m 0755 target/release/chaperonectl /out/chaperonectl

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="chaperonectl" \
      org.opencontainers.image.description="chaperonectl: generate CRDs, test and explain policies offline, verify audit logs." \
      org.opencontainers.image.source="https://github.com/chaperone-dev/chaperone" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/chaperonectl /usr/local/bin/chaperonectl
# distroless's nonroot user.
USER 65532:65532
# Mount policy files and run e.g.
#   docker run --rm -v "$PWD/examples:/examples:ro" chaperone-chaperonectl \
#     policy test /examples/basic/policy-test.yaml
WORKDIR /home/nonroot
ENTRYPOINT ["/usr/local/bin/chaperonectl"]
CMD ["--help"]
