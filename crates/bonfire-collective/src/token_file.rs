//! A job's secret shared through a file, for workers that all run on one
//! host and were given none ([`JobToken::HostFile`](crate::JobToken)): rank
//! 0 writes a fresh random token to a file only this user can read, in a
//! folder only this user can enter, and the other ranks read it there.
//! Another user of the host, or anyone on the network, who reaches the
//! store's port cannot learn it.
//!
//! The file is named after the store's address, which no two live jobs
//! share. A file that an earlier job on the same address left behind holds
//! a stale token: the store refuses it, and the reader tries again until
//! rank 0 has written the new one.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};

/// A fresh random token: 16 bytes from the kernel, in hex.
pub fn random_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The token file of the store at `store_addr`, in this user's private folder
/// of the temporary directory.
pub(crate) fn path(store_addr: &str) -> Result<PathBuf> {
    path_in(&std::env::temp_dir(), store_addr)
}

/// The token file of the store at `store_addr`, in `base/bonfire-UID` (made
/// if missing, refused if anyone else could enter it).
fn path_in(base: &Path, store_addr: &str) -> Result<PathBuf> {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = base.join(format!("bonfire-{uid}"));
    let io = |e| CommError::io(format!("the job token's folder {}", dir.display()), e);
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(io)?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(CommError::Unavailable(format!(
            "{} is not a folder that only this user (uid {uid}) can enter, so the job token cannot be kept \
             there; remove it, or give every worker {} yourself",
            dir.display(),
            crate::JOB_TOKEN_VAR
        )));
    }
    let name: String =
        store_addr.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
    Ok(dir.join(format!("rendezvous-{name}")))
}

/// Rank 0's token file: removed when the job ends, unless a later job has
/// written its own there.
pub(crate) struct TokenFile {
    path: PathBuf,
    token: String,
}

impl TokenFile {
    /// Writes `token` to `path` for the other ranks, replacing whatever an
    /// earlier job left, readable by this user only.
    pub fn publish(path: PathBuf, token: String) -> Result<Self> {
        let io = |e| CommError::io(format!("writing the job token to {}", path.display()), e);
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io)?;
        file.write_all(token.as_bytes()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(TokenFile { path, token })
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The token in `path`, waiting for rank 0 to write it until `deadline`.
pub(crate) fn read(path: &Path, deadline: Instant, waited: Duration) -> Result<String> {
    loop {
        match std::fs::read_to_string(path) {
            Ok(token) if !token.is_empty() => return Ok(token),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CommError::io(format!("reading the job token from {}", path.display()), e)),
        }
        if Instant::now() >= deadline {
            tracing::error!(
                "rank 0 wrote no job token to {} in {waited:?}: workers on other hosts cannot read it; give every \
                 worker {} instead",
                path.display(),
                crate::JOB_TOKEN_VAR
            );
            return Err(CommError::Timeout { op: "rendezvous (reading rank 0's job token file)", rank: 0, waited });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_user_can_read_the_token_and_rank_0_removes_it() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let path = path(&format!("127.0.0.1:{port}")).unwrap();
        let dir = path.parent().unwrap();
        assert_eq!(std::fs::metadata(dir).unwrap().permissions().mode() & 0o777, 0o700);
        // A stale file from an earlier job is replaced.
        std::fs::write(&path, "stale").unwrap();
        let token = random_token().unwrap();
        assert_eq!(token.len(), 32);
        let file = TokenFile::publish(path.clone(), token.clone()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read(&path, Instant::now(), Duration::ZERO).unwrap(), token);
        drop(file);
        assert!(!path.exists(), "rank 0 removes its token file");
        let err = read(&path, Instant::now() + Duration::from_millis(100), Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, CommError::Timeout { rank: 0, .. }), "{err}");
    }

    #[test]
    fn a_folder_that_others_can_enter_is_refused() {
        let base = std::env::temp_dir().join(format!("bonfire-token-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let mine = path_in(&base, "127.0.0.1:1").unwrap();
        let dir = mine.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = path_in(&base, "127.0.0.1:1").unwrap_err().to_string();
        assert!(err.contains("only this user") && err.contains("BONFIRE_JOB_TOKEN"), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
