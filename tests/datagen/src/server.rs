//! What the real database servers of the tests share: running their programs as their own
//! unprivileged user, and the error that names the program that failed.

use std::path::Path;
use std::process::{Command, Output};

/// A server program that could not be run or failed.
#[derive(Debug, thiserror::Error)]
#[error("{program} {args}: {detail}")]
pub struct ServerError {
    program: String,
    args: String,
    detail: String,
}

impl ServerError {
    pub fn io(what: &str, p: &Path, e: std::io::Error) -> Self {
        ServerError { program: what.into(), args: p.display().to_string(), detail: e.to_string() }
    }
}

/// Whether this process can run programs as another user: it must be root, with `setpriv`.
pub fn can_switch_user() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("setpriv").arg("--version").output().is_ok()
}

/// `program` with `args`, as `user`: a command ready to run or spawn.
pub fn command_as(user: &str, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={user}"), &format!("--regid={user}"), "--init-groups", "--"]).arg(program).args(args);
    cmd
}

/// Runs `program` with `args` as `user`; its output, or an error with its status and output.
pub fn run_as(user: &str, program: &Path, args: &[&str]) -> Result<Output, ServerError> {
    let fail = |detail: String| ServerError { program: program.display().to_string(), args: args.join(" "), detail };
    let out = command_as(user, program, args).output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        return Err(fail(format!("{}\n{}{}", out.status, text(&out.stdout), text(&out.stderr))));
    }
    Ok(out)
}

/// Creates `dirs` and gives them to `user`.
pub fn make_dirs_for(user: &str, dirs: &[&Path]) -> Result<(), ServerError> {
    for dir in dirs {
        std::fs::create_dir_all(dir).map_err(|e| ServerError::io("mkdir", dir, e))?;
        let ok = Command::new("chown").arg("-R").arg(format!("{user}:{user}")).arg(dir).status();
        if !ok.is_ok_and(|s| s.success()) {
            return Err(ServerError::io("chown", dir, std::io::Error::other("chown failed")));
        }
    }
    Ok(())
}

pub fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
