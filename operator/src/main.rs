//! The `ferry-operator` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ferry-operator", version, about = "Ferry operator")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Print the CRDs (YAML), or write them into a directory.
    Crd {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        write: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Crd { write: None } => {
            for (_, yaml) in ferry_operator::crd::rendered() {
                println!("---\n{yaml}");
            }
            ExitCode::SUCCESS
        }
        Cmd::Crd { write: Some(dir) } => {
            for (name, yaml) in ferry_operator::crd::rendered() {
                let path = dir.join(&name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("ferry-operator: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
    }
}
