//! `ch-test-device --socket PATH --control PATH` runs the device;
//! `ch-test-device --control PATH --ask COMMAND` asks a running one (see the
//! crate docs for the commands).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "ch-test-device", about = "A vfio-user DMA test device")]
struct Cli {
    /// The vfio-user socket the VMM connects to.
    #[arg(long, required_unless_present = "ask")]
    socket: Option<PathBuf>,
    /// The line-based control socket for tests.
    #[arg(long)]
    control: PathBuf,
    /// Offer no mmappable BAR area: every BAR access is a message.
    #[arg(long, conflicts_with = "ask")]
    no_mmap: bool,
    /// Send COMMAND (maps, read IOVA LEN, write IOVA BYTE, refuse N, log)
    /// to the device listening on --control, print its answer and exit.
    #[arg(long, value_name = "COMMAND", conflicts_with = "socket")]
    ask: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(socket) = cli.socket else {
        let command = cli.ask.unwrap_or_default();
        return match test_device::ask(&cli.control, &command) {
            Ok(answer) if answer.starts_with("error:") => {
                eprintln!("ch-test-device: {answer}");
                ExitCode::FAILURE
            }
            Ok(answer) => {
                println!("{answer}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ch-test-device: {e}");
                ExitCode::FAILURE
            }
        };
    };
    let state = test_device::SharedState::default();
    let started = test_device::control(&cli.control, state.clone())
        .and_then(|_| test_device::serve(&socket, state, !cli.no_mmap));
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
