//! `rackboot`: parse the command line, set up logging and the runtime, run, and map
//! errors to exit codes (0 ok, 1 failed, 2 bad usage or config).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the C library's allocator: musl's (the static release binary)
/// made small HTTP requests 40% slower than glibc's, and mimalloc beats both.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match rackboot::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RACKBOOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rackboot: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(rackboot::cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.downcast_ref::<rackboot::cli::UsageError>().is_some() {
                2
            } else {
                1
            };
            eprintln!("rackboot: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("rackboot:   caused by: {cause}");
            }
            ExitCode::from(code)
        }
    }
}
