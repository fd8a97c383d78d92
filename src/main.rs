//! The rollcall binary: parses the command line and hands it to `rollcall::cli`.

use clap::Parser;

fn main() {
    let cli = rollcall::cli::Cli::parse();
    std::process::exit(rollcall::cli::run(cli));
}
