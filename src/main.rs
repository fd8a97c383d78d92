//! The rollcall binary: parses the command line and hands it to `rollcall::cli`.

use clap::Parser;

fn main() {
    // A helper process of a pass (see `cli::run_helper`) goes straight to its work.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(code) = rollcall::cli::run_helper(&args) {
        std::process::exit(code);
    }
    let cli = rollcall::cli::Cli::parse_from(args);
    std::process::exit(rollcall::cli::run(cli));
}
