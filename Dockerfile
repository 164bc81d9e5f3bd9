# session-cache: a multi-stage build; the runtime image holds the binary and nothing else
# it does not need, and runs as an unprivileged user.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a change to the service's code reuses their layer.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin session-cache
COPY --from=build /src/target/release/session-cache /usr/local/bin/session-cache
USER 10001:10001
# A container is reached through its network interface, not loopback. Without caller
# authentication the service refuses to start on it: configure authentication, or set
# SESSION_CACHE_ALLOW_UNAUTHENTICATED=true where a network policy guards the port.
ENV SESSION_CACHE_LISTEN=0.0.0.0:50051
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/session-cache"]
