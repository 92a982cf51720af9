//! Log output: tracing-subscriber, human-readable or JSON lines, filtered by
//! the config's `log.level` unless `RUST_LOG` is set. The level follows the
//! configuration on reload ([`set_level`]). Nothing secret is ever passed
//! to a log macro: passwords travel as `imap::Secret`, which does not
//! print.

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::{Log, LogFormat};

type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Replaces the live filter; set once by [`init`] unless `RUST_LOG` rules.
static SET_LEVEL: OnceLock<SetLevel> = OnceLock::new();

pub fn init(log: &Log) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_rules = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    // Colour only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written (disk full, closed pipe) is
        // lost, never reported on the same broken stderr, which would
        // panic and take the proxy down with it.
        .log_internal_errors(false)
        .with_ansi(ansi);
    macro_rules! install {
        ($builder:expr) => {{
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if !env_rules {
                let _ = SET_LEVEL.set(Box::new(move |level: &str| {
                    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                    handle.reload(filter).map_err(|e| e.to_string())
                }));
            }
            builder.init()
        }};
    }
    match log.format {
        LogFormat::Human => install!(builder.with_target(false)),
        LogFormat::Json => install!(builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)),
    }
}

/// Applies a new `log.level` to the running process; a no-op when
/// `RUST_LOG` set the filter at start.
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(set) => set(level),
        None => Ok(()),
    }
}
