//! What every command shares, and the `trellis-proxy` binary with them: logging and durations.

/// Parses `10s`, `1h30m`, `250ms`.
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    trellis_config::model::duration::parse_duration(s)
}

/// Logs to stderr; `RUST_LOG` overrides `default`.
pub(crate) fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
