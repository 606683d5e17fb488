# syntax=docker/dockerfile:1
# Multi-stage build: a full Rust toolchain builds the binary; the runtime image
# holds only the binary and the default config, and runs as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY src ./src
COPY migrations ./migrations
COPY config ./config
COPY bench ./bench
RUN cargo build --release --locked --bin tollgate \
    && strip target/release/tollgate

FROM debian:bookworm-slim AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=build /src/target/release/tollgate /usr/local/bin/tollgate
COPY config/tollgate.example.toml /etc/tollgate/tollgate.toml
USER 10001:10001
WORKDIR /var/lib/tollgate
ENV TOLLGATE_LISTEN=0.0.0.0:8080 \
    TOLLGATE_DATABASE_URL=sqlite:///var/lib/tollgate/tollgate.db \
    TOLLGATE_CONFIG=/etc/tollgate/tollgate.toml
EXPOSE 8080
VOLUME ["/var/lib/tollgate"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/tollgate", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
