# The Ferry sidecar, injected next to an app by the operator's webhook
# (or run by hand). Its outbox lives in a volume mounted at the data dir.
#
#   docker build -f docker/sidecar.Dockerfile -t ghcr.io/ferry-dev/ferry-sidecar:0.1.0 .
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
RUN cargo build --release --locked -p ferry-sidecar \
    && install -D -m 0755 target/release/ferry-sidecar /out/ferry-sidecar \
    && mkdir -p /out/data

# glibc and libgcc, no shell, no package manager; user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ferry-sidecar /usr/local/bin/ferry-sidecar
# The outbox's default place (the injected sidecar mounts its data volume
# here); owned by the runtime user so a plain `docker run` works too.
COPY --from=build --chown=65532:65532 /out/data /var/lib/ferry
ENV FERRY_DATA_DIR=/var/lib/ferry
# Numeric, so Kubernetes' runAsNonRoot can check it without a passwd file.
USER 65532:65532
EXPOSE 7600 7601
ENTRYPOINT ["/usr/local/bin/ferry-sidecar"]
