//! Where the binary gets a repository's password: a key command (a KMS or vault client), a
//! file, an environment variable, or the terminal, in that order.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;

use dataplane::error::Error;
use dataplane::repo::{first_line, Secret};

/// The places one secret may come from, as the command line and environment give them.
pub(crate) struct Sources {
    pub(crate) command: Option<String>,
    pub(crate) file: Option<PathBuf>,
    /// The variable holding the secret itself.
    pub(crate) env: &'static str,
    /// What it is, for prompts and messages: `password`, `new password`.
    pub(crate) what: &'static str,
    /// The options that give it, for the message when none does.
    pub(crate) options: &'static str,
}

impl Sources {
    /// The secret. `confirm`: a terminal is asked twice (a new password).
    pub(crate) fn read(&self, confirm: bool) -> Result<Secret, Error> {
        let secret = if let Some(cmd) = &self.command {
            from_command(cmd)?
        } else if let Some(file) = &self.file {
            let bytes = std::fs::read(file)
                .map_err(|e| Error::Usage(format!("{}: cannot read the {} file: {e}", file.display(), self.what)))?;
            first_line(bytes)
        } else if let Some(value) = std::env::var_os(self.env) {
            value.into_encoded_bytes()
        } else if std::io::stdin().is_terminal() {
            self.prompt(confirm)?
        } else {
            return Err(Error::Usage(format!("this needs the repository's {}: give {}", self.what, self.options)));
        };
        if secret.is_empty() {
            return Err(Error::Usage(format!("the {} is empty", self.what)));
        }
        Ok(secret)
    }

    /// The secret when the command line or environment gives one (never the terminal: a
    /// daemon has none), else `None`.
    pub(crate) fn given(&self) -> Result<Option<Secret>, Error> {
        let given = self.command.is_some() || self.file.is_some() || std::env::var_os(self.env).is_some();
        given.then(|| self.read(false)).transpose()
    }

    fn prompt(&self, confirm: bool) -> Result<Secret, Error> {
        let ask = |prompt: &str| {
            rpassword::prompt_password(prompt)
                .map(String::into_bytes)
                .map_err(|e| Error::Usage(format!("cannot read the {} from the terminal: {e}", self.what)))
        };
        let secret = ask(&format!("{}: ", self.what))?;
        if confirm && ask(&format!("{} again: ", self.what))? != secret {
            return Err(Error::Usage(format!("the two {}s differ", self.what)));
        }
        Ok(secret)
    }
}

/// The first line of what a key command prints; it must exit 0.
fn from_command(cmd: &str) -> Result<Secret, Error> {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| Error::Usage(format!("key command {cmd:?}: cannot run it: {e}")))?;
    if !out.status.success() {
        return Err(Error::Usage(format!("key command {cmd:?} failed ({})", out.status)));
    }
    Ok(first_line(out.stdout))
}
