# Turnpike's image: one binary (`turnpike api|worker|migrate|keys|mock-model`)
# on a minimal runtime, running as a non-root user.

# Build: the workspace, in release, with the dependency builds cached.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY services ./services
COPY migrations ./migrations
COPY web ./web
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p turnpike \
    && cp target/release/turnpike /usr/local/bin/turnpike

# Run: glibc and CA certificates only (distroless), no shell, non-root.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/turnpike /usr/local/bin/turnpike
USER 65532:65532
# mimalloc is built not to ask for transparent huge pages, which is enough
# where the host's THP mode is `madvise`; under `always` the kernel would
# still back its arenas with huge pages (about 13 KiB more per idle stream):
# this turns THP off for the process.
ENV MIMALLOC_ALLOW_THP=0
EXPOSE 8080 9090 9091
ENTRYPOINT ["/usr/local/bin/turnpike"]
CMD ["api"]
