use std::path::PathBuf;

/// A data file that is missing, unreadable or not what it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why (part of the message, so a chain of errors names it once).
        cause: std::io::Error,
    },
    /// A file is not in the format it should be.
    #[error("{path}: {what}")]
    Format {
        /// The file.
        path: PathBuf,
        /// How it differs.
        what: String,
    },
    /// Data that does not hold together (counts, labels).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn format(path: &std::path::Path, what: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), what: what.into() }
    }
}

/// Result of reading a data set.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
