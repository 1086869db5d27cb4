# syntax=docker/dockerfile:1
# keysmith's image: a release build on Debian 12, copied into distroless's
# Debian 12 "cc" base (glibc and libgcc, which is all the binary links: no
# OpenSSL, TLS is rustls), which has no shell or package manager and runs
# as the unprivileged user 65532 ("nonroot").
#
#   docker build -t keysmith .
#
# The chart (charts/keysmith) runs it as `keysmith run` with a read-only
# root filesystem; nothing is written at run time. It is built without the
# default `dev` feature: no local control plane, no fail points, none of
# their dependencies.

# rust-version in Cargo.toml.
ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --no-default-features --bin keysmith \
 && install -D -m 0755 target/release/keysmith /out/keysmith

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/keysmith /usr/local/bin/keysmith
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/keysmith"]
CMD ["run"]
