# The Ferry operator: the Topic and Subscription controllers and the
# sidecar-injection webhook. Deployed by charts/ferry.
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/ferry-dev/ferry-operator:0.1.0 .
#
# Built from the repository root (see .dockerignore). No container engine runs
# on the machines Ferry is developed on, so this file is not built by the
# tests: keep it plain.

# The toolchain the workspace is tested with (rust-version in Cargo.toml is
# the minimum). Debian bookworm, as the runtime image below: same glibc.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Symbols stay (readable backtraces); the debug info of the release profile
# (kept there for profiling) does not.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo
RUN cargo build --release --locked -p ferry-operator \
    && install -D -m 0755 target/release/ferry-operator /out/ferry-operator

# glibc and libgcc, no shell, no package manager; user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ferry-operator /usr/local/bin/ferry-operator
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd file.
USER 65532:65532
EXPOSE 8080 8443
ENTRYPOINT ["/usr/local/bin/ferry-operator"]
