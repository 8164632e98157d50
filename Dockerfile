# syntax=docker/dockerfile:1
# Multi-stage build of the three verimail binaries. Not exercised by CI (no
# Docker engine on the CI machines); see README "Docker".

# --- build -------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src

# Dependencies first, in their own layer: only the manifests and the lock file
# are copied, with empty crate sources, so editing code does not rebuild them.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY producer/Cargo.toml producer/
COPY cli/Cargo.toml cli/
COPY worker/Cargo.toml worker/
COPY confirm-gateway/Cargo.toml confirm-gateway/
COPY tests/Cargo.toml tests/
COPY bench/Cargo.toml bench/
# The patched sqlx-core that [patch.crates-io] points at (vendor/README.md).
COPY vendor vendor
RUN for crate in shared producer cli worker confirm-gateway tests bench; do \
        mkdir -p $crate/src $crate/benches && echo "" > $crate/src/lib.rs; \
    done \
 && for crate in cli worker confirm-gateway bench; do echo "fn main() {}" > $crate/src/main.rs; done \
 && sed -i '/^\[\[bench\]\]/,/^$/d' shared/Cargo.toml worker/Cargo.toml confirm-gateway/Cargo.toml producer/Cargo.toml \
 && cargo build --release --locked -p verimail-cli -p verimail-worker -p verimail-gateway \
 && rm -rf shared producer cli worker confirm-gateway tests bench

# Now the real sources.
COPY . .
RUN touch shared/src/lib.rs producer/src/*.rs cli/src/*.rs worker/src/*.rs confirm-gateway/src/*.rs \
 && cargo build --release --locked -p verimail-cli -p verimail-worker -p verimail-gateway

# --- runtime -----------------------------------------------------------------
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /app --create-home verimail
COPY --from=build /src/target/release/verimail /src/target/release/verimail-worker /src/target/release/verimail-gateway /usr/local/bin/
USER verimail
WORKDIR /app
ENV LOG_FORMAT=json
CMD ["verimail-worker"]
