//! The `ferry-sidecar` binary; everything is in the library.

fn main() -> std::process::ExitCode {
    ferry_sidecar::main()
}
