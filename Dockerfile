# Multi-stage build: compile in the Rust image, run as a non-root user in a slim Debian.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin courier

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/courier --create-home courier
COPY --from=build /src/target/release/courier /usr/local/bin/courier
USER courier
ENV COURIER_LISTEN=0.0.0.0:8080 \
    COURIER_DATA_DIR=/var/lib/courier
VOLUME ["/var/lib/courier"]
EXPOSE 8080
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/courier"]
CMD ["serve"]
