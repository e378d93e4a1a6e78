//! `rackboot`: parse the command line, set up logging and the runtime, run, and map
//! errors to exit codes (0 ok, 1 failed, 2 bad usage or config).

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the C library's allocator: musl's (the static release binary)
/// made small HTTP requests 40% slower than glibc's, and mimalloc beats both.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Log output: stderr, with the credentials of any URL in a line replaced by `***`
/// (errors of every module name the URLs they fetched, and a source URL may carry
/// `user:pass@`). The formatter hands over one whole line per write.
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut err = std::io::stderr().lock();
        match std::str::from_utf8(buf) {
            Ok(s) if s.contains('@') => {
                err.write_all(rackboot::config::redact_text(s).as_bytes())?
            }
            _ => err.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

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
        .with_writer(|| RedactingStderr)
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
            let redact = |x: &dyn std::fmt::Display| rackboot::config::redact_text(&x.to_string());
            eprintln!("rackboot: error: {}", redact(&e));
            for cause in e.chain().skip(1) {
                eprintln!("rackboot:   caused by: {}", redact(&cause));
            }
            ExitCode::from(code)
        }
    }
}
