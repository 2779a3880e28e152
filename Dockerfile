# Portcullis container image: build with the Rust toolchain, run on distroless as non-root.
#
#   docker build -t portcullis .
#   docker run --rm -p 9191:9191 -p 9192:9192 -v "$PWD/my-config:/etc/portcullis:ro" portcullis
#
# The image ships config/ at /etc/portcullis as a reference, but that sample listens on
# 127.0.0.1 and trusts the DEVELOPMENT issuer: mount your own config (listen 0.0.0.0:9191,
# admin_listen 0.0.0.0:9192, your identity provider), as deploy/kubernetes/ does.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# Cargo loads every member of the workspace, so the module crate must be in the context
# even though only the service is built here.
COPY module ./module
RUN cargo build --release --locked --bin portcullis \
    && install -m 0755 target/release/portcullis /portcullis

# distroless/cc: glibc and libgcc only, no shell, no package manager. `nonroot` is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /portcullis /usr/local/bin/portcullis
COPY config/ /etc/portcullis/
USER 65532:65532
# 9191: gRPC ext_authz (Envoy). 9193: Envoy's HTTP ext_authz API (`server.http_listen`).
# 9192: admin (/healthz, /readyz, /metrics).
EXPOSE 9191 9192 9193
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["serve", "--config", "/etc/portcullis/portcullis.yaml"]
