//! One error type for the crate: every failure a caller can cause names the
//! operation and the offending value instead of panicking.

/// Errors returned by kvsieve.
///
/// ```
/// let e = "spin".parse::<kvsieve::Speculate>().unwrap_err();
/// assert!(matches!(e, kvsieve::Error::InvalidOption(_)));
/// ```
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor shapes do not fit the operation.
    #[error("shape error in {op}: {msg}")]
    Shape {
        /// The operation that rejected its inputs.
        op: &'static str,
        /// What was wrong, with the offending sizes.
        msg: String,
    },
    /// No usable GPU adapter was found.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The adapter lacks a feature or limit that is needed.
    #[error("adapter unsupported: {0}")]
    Unsupported(String),
    /// An option or argument has an invalid value.
    #[error("invalid option: {0}")]
    InvalidOption(String),
    /// A fixed capacity (KV cache pages, binding size, positions) would be exceeded.
    #[error("capacity exceeded: {0}")]
    Capacity(String),
    /// The GPU reported a validation or internal error for the call's work.
    /// The work was not done; the engine drops its cached conversation and
    /// stays usable.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// The device (or, for the reference executor, the host) has not got the
    /// memory the call asked for. Nothing was half-done; smaller work (a
    /// shorter context, a smaller model) may fit.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The device was lost (driver reset, GPU removed or hung, or destroyed).
    /// Every later call on it returns this error; load the model again.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A file's contents are malformed or unsupported.
    #[error("{}", in_file(path, msg))]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, naming the field.
        msg: String,
    },
    /// An invariant of kvsieve itself broke (a bug, not the caller's mistake).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A format error of a file not yet named (a parser of bytes); the caller
    /// names it with [`Error::in_file`].
    pub(crate) fn malformed(msg: impl Into<String>) -> Self {
        Self::format("", msg)
    }

    /// Names the file of a format error raised without one.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Error::Format { path: p, msg } if p.as_os_str().is_empty() => Error::Format {
                path: path.to_path_buf(),
                msg,
            },
            other => other,
        }
    }

    /// A format error in `path`.
    pub fn format(path: impl Into<std::path::PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

fn in_file(path: &std::path::Path, msg: &str) -> String {
    if path.as_os_str().is_empty() {
        msg.to_string()
    } else {
        format!("{}: {msg}", path.display())
    }
}

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn shape_err<T>(op: &'static str, msg: impl Into<String>) -> Result<T> {
    Err(Error::Shape {
        op,
        msg: msg.into(),
    })
}
