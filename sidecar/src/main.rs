//! The `ferry-sidecar` binary; everything is in the library.

/// jemalloc instead of glibc's malloc. Under sustained delivery glibc's
/// malloc took ~18% of the sidecar's CPU (`malloc_consolidate`, arena lock
/// waits between the runtime's threads); with jemalloc the same load is
/// delivered 5-20% faster on the nats backend and 25-30% on the embedded
/// broker (A/B runs in issue #5's note). Its settings (one arena, dirty pages
/// returned after 1 s) are in `.cargo/config.toml`: they keep the peak RSS
/// where glibc's was.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    ferry_sidecar::main()
}
