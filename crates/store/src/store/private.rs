//! The data directory and the files in it are the server's alone: the directory is 0700, the
//! database (and SQLite's `-wal`/`-shm`, which SQLite creates with the database file's mode), the
//! master key and anything else written there 0600. `main` also sets the process umask to 0077,
//! so files that other code creates (exports, a `-journal`) are private too.

use std::path::Path;

/// Creates `dir` (and missing parents) 0700; an existing directory open to group or others is
/// narrowed to 0700, with a warning.
#[cfg(unix)]
pub fn dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.as_os_str().is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", mode & 0o777), "the data directory was open to other users; narrowing it to 0700");
        if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
            tracing::warn!(path = %dir.display(), error = %e, "could not narrow the data directory to 0700");
        }
    }
    Ok(())
}

/// Creates `file` empty with mode 0600 if it does not exist (SQLite then gives its `-wal` and
/// `-shm` files the same mode); an existing file open to group or others is narrowed to 0600.
#[cfg(unix)]
pub fn file(file: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(file)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %file.display(), mode = format!("{:o}", mode & 0o777), "a data file was open to other users; narrowing it to 0600");
                if let Err(e) =
                    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600))
                {
                    tracing::warn!(path = %file.display(), error = %e, "could not narrow a data file to 0600");
                }
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Files the server creates from now on are 0600 and directories 0700 (umask 0077).
#[cfg(unix)]
pub fn restrict_umask() {
    // SAFETY: umask only sets the process's file-mode creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

#[cfg(not(unix))]
pub fn dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)
}
#[cfg(not(unix))]
pub fn file(_file: &Path) -> std::io::Result<()> {
    Ok(())
}
#[cfg(not(unix))]
pub fn restrict_umask() {}
