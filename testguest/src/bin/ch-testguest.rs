//! `ch-testguest memconv --ops OPS [--ops OPS ...] [--poweroff] [--quiet] --out FILE`

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use test_guest::{MemconvOptions, OPS_SYNTAX, Op, memconv_elf, parse_ops};

#[derive(Parser)]
#[command(name = "ch-testguest", about = "Writes the project's own test guests")]
struct Cli {
    #[command(subcommand)]
    guest: Guest,
}

#[derive(Subcommand)]
enum Guest {
    /// A guest that converts memory through the doorbell, drives the PCI
    /// test device and its configuration space, and reports each op.
    #[command(after_help = format!("Ops:\n{OPS_SYNTAX}"))]
    Memconv {
        /// Comma-separated ops (listed below), e.g.
        /// `shared@0x1000000+16K,cfg-write@1:0x10=0xc0004000`.
        /// Repeat the flag to give vCPU 1, 2, ... their own list.
        #[arg(long, required = true, value_parser = parse_ops)]
        ops: Vec<Vec<Op>>,
        /// Power the VM off after the summary line instead of idling.
        #[arg(long)]
        poweroff: bool,
        /// Print only the summary line, not a line per op.
        #[arg(long)]
        quiet: bool,
        /// Where to write the guest ELF.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.guest {
        Guest::Memconv {
            ops,
            poweroff,
            quiet,
            out,
        } => {
            let image = memconv_elf(&ops, MemconvOptions { poweroff, quiet });
            if let Err(e) = std::fs::write(&out, image) {
                eprintln!("ch-testguest: cannot write {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
