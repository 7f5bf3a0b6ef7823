use std::path::PathBuf;

/// A data file that is missing, unreadable or not what it claims to be.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn format(path: &std::path::Path, what: impl Into<String>) -> Self {
        DataError::Format { path: path.to_path_buf(), what: what.into() }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
