//! The `portcullis` binary: parse arguments, set up logging, run a command, exit non-zero
//! with a clear message on failure. No logic of its own (see `cli` and `server`).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use portcullis::cli::{self, Cli, Command};
use portcullis::server::Server;

/// mimalloc instead of glibc malloc: a Check allocates and frees many small buffers (h2
/// frames, the decoded CheckRequest, the response); bench/ measured the difference.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => serve(cli.config),
        Some(Command::Serve { config }) => serve(config),
        Some(Command::Check { config, strict }) => cli::check(&config, strict)
            .map(|report| print!("{report}"))
            .map_err(anyhow::Error::from),
        Some(Command::Explain(args)) => explain(args),
        Some(Command::Test(args)) => return policy_test(&args),
        Some(Command::Apikey(cli::ApikeyCommand::New(args))) => cli::apikey_new(&args)
            .map(|k| {
                for w in &k.warnings {
                    eprintln!("warning: {w}");
                }
                eprintln!(
                    "# API key (shown once: store it now, only its hash is kept in the config):"
                );
                println!("{}", k.key);
                eprintln!("# Add this entry under `api_keys.keys` (or to the key file):");
                print!("{}", k.entry);
                eprintln!("{}", k.next);
            })
            .map_err(anyhow::Error::from),
        Some(Command::Token(args)) => cli::token(&args)
            .map(|t| {
                eprintln!(
                    "development-only token for {} (never valid in production)",
                    cli::DEV_ISSUER
                );
                println!("{t}");
            })
            .map_err(anyhow::Error::from),
        Some(Command::Approvals(args)) => approvals(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // With one CPU to run on (taskset, a one-CPU machine or cgroup quota), a single-threaded
    // scheduler does the same work without cross-thread wake-ups: ~20% more checks per
    // CPU-second in bench/ (issue 4). TOKIO_WORKER_THREADS (read by tokio) forces the
    // multi-threaded scheduler.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let forced = std::env::var_os("TOKIO_WORKER_THREADS").is_some();
    let mut builder = if cpus == 1 && !forced {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_logging() {
    // Logs are JSON on stderr; stdout carries only the audit log.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();
}

fn explain(args: cli::ExplainArgs) -> anyhow::Result<()> {
    let explanation = runtime()?.block_on(cli::explain(&args))?;
    if args.json {
        println!("{}", explanation.to_json());
    } else {
        print!("{}", explanation.to_text());
    }
    Ok(())
}

/// `test`: exit 0 when every case passes, 1 when one fails, 2 when a file cannot be used.
fn policy_test(args: &cli::TestArgs) -> ExitCode {
    let reports = runtime().and_then(|rt| Ok(rt.block_on(cli::test(args))?));
    match reports {
        Ok(reports) => {
            for report in &reports {
                print!("{}", report.to_text());
            }
            if reports.iter().any(|r| r.failed() > 0) {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn approvals(args: portcullis::approvals::client::ApprovalsArgs) -> anyhow::Result<()> {
    let out = runtime()?.block_on(portcullis::approvals::client::run(&args))?;
    print!("{out}");
    Ok(())
}

/// Raises the open-files soft limit (often 1 024) towards what the listeners' caps may hold:
/// `max_connections` on each ext_authz listener, the admin and approvals caps, and room for
/// key fetches, Redis and files. Short of it (the hard limit is lower), a warning names the
/// setting, because running out of descriptors also stops reloads.
fn raise_open_files_limit(max_connections: usize) {
    use portcullis::listener::SMALL_LISTENER_MAX_CONNECTIONS;
    let want = (2 * max_connections + 2 * SMALL_LISTENER_MAX_CONNECTIONS + 1024) as u64;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got >= want => {}
        Ok(got) => tracing::warn!(
            limit = got,
            wanted = want,
            "the open-files limit is below what `server.max_connections` ({max_connections} per \
             ext_authz listener) may need; raise it (`ulimit -n`, systemd `LimitNOFILE`) or \
             lower `server.max_connections`"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
}

fn serve(config_path: std::path::PathBuf) -> anyhow::Result<()> {
    init_logging();
    let config = portcullis::config::load(&config_path)?;
    for warning in &config.warnings {
        tracing::warn!(config = %config_path.display(), "{warning}");
    }
    raise_open_files_limit(config.file.server.max_connections);
    let rt = runtime()?;
    tracing::info!(
        scheduler = ?rt.handle().runtime_flavor(),
        "async runtime started"
    );
    rt.block_on(async {
        let server = Server::start_watching(config, config_path.clone()).await?;
        shutdown_signal().await;
        let delay = server.shutdown_delay();
        if !delay.is_zero() {
            // Load balancers need a moment to stop sending new work here: until then, keep
            // serving everything while reporting not ready. A second signal cuts it short.
            server.leave_rotation();
            tracing::info!(
                delay = %humantime::format_duration(delay),
                "shutting down: not ready, still serving until shutdown_delay passes"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown_signal() => {
                    tracing::info!("second signal: not waiting for the rest of shutdown_delay");
                }
            }
        }
        tracing::info!("shutting down: finishing in-flight checks");
        server.shutdown().await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
