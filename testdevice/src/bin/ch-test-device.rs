//! `ch-test-device --socket PATH --control PATH`: see the crate docs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "ch-test-device", about = "A vfio-user DMA test device")]
struct Cli {
    /// The vfio-user socket the VMM connects to.
    #[arg(long)]
    socket: PathBuf,
    /// The line-based control socket for tests.
    #[arg(long)]
    control: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let state = test_device::SharedState::default();
    let started = test_device::control(&cli.control, state.clone())
        .and_then(|_| test_device::serve(&cli.socket, state));
    match started {
        Ok(server) => {
            println!("ch-test-device: ready");
            let _ = server.join();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ch-test-device: {e}");
            ExitCode::FAILURE
        }
    }
}
