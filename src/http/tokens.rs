//! The accepted API tokens: `api_token` and the lines of `api_token_file`,
//! the file re-read on SIGHUP.
//!
//! Why a list and a reload: rotating a token means a moment where back ends
//! hold the new one and nodes the old (or the reverse). With both accepted at
//! once the operator adds the new token to every node, reloads, switches the
//! back ends, then removes the old one and reloads again, and no request is
//! refused along the way (docs/operations.md). The list is swapped whole
//! under a lock held only for an `Arc` clone, so a request never sees a
//! half-read file.
//!
//! A reload that fails (the file unreadable, or holding no token while
//! tokens were required) keeps the list in force and says so at ERROR: a
//! typo during a rotation must not open the API nor lock the back ends out.
//! Tokens are never logged; only their count is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use subtle::ConstantTimeEq;

/// The accepted tokens, reloadable.
pub struct Tokens {
    fixed: Option<Box<[u8]>>,
    file: Option<PathBuf>,
    from_file: RwLock<Arc<[Box<[u8]>]>>,
}

impl Tokens {
    /// `api_token` plus the tokens of `file`, read now. A file that cannot be
    /// read, or that holds no token, is an error: the operator named it to
    /// require tokens.
    pub fn load(fixed: Option<&str>, file: Option<&Path>) -> Result<Tokens, String> {
        let from_file = match file {
            Some(path) => read(path)?,
            None => Vec::new(),
        };
        Ok(Tokens {
            fixed: fixed.map(|t| t.as_bytes().into()),
            file: file.map(Path::to_path_buf),
            from_file: RwLock::new(from_file.into()),
        })
    }

    /// How many tokens are accepted right now.
    pub fn count(&self) -> usize {
        usize::from(self.fixed.is_some()) + self.current().len()
    }

    /// Whether requests to the management API must carry a token. A file,
    /// once named, always holds at least one (a load or reload that finds
    /// none fails), so this takes no lock.
    pub fn required(&self) -> bool {
        self.fixed.is_some() || self.file.is_some()
    }

    /// Whether `given` is one of the accepted tokens. Every token is
    /// compared, each in constant time, and the results are combined
    /// without branching, so the answer's timing says nothing about which
    /// token (or which prefix) came close.
    pub fn accepts(&self, given: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0);
        if let Some(t) = &self.fixed {
            ok |= given.ct_eq(t);
        }
        for t in self.current().iter() {
            ok |= given.ct_eq(t);
        }
        ok.into()
    }

    /// Re-reads `api_token_file`. On success the new list replaces the old
    /// at once and its size is logged; on failure the old list stays and the
    /// reason is logged at ERROR. Without a file there is nothing to reload.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(path) = &self.file else {
            tracing::info!("reload: no api_token_file is set; nothing to re-read");
            return Ok(self.count());
        };
        let result = read(path).and_then(|list| {
            if list.is_empty() && self.fixed.is_none() {
                Err(format!(
                    "{} holds no token; an empty list would open the API",
                    path.display()
                ))
            } else {
                Ok(list)
            }
        });
        match result {
            Ok(list) => {
                let n = list.len();
                *self.from_file.write().unwrap_or_else(|e| e.into_inner()) = list.into();
                let total = self.count();
                tracing::info!(
                    file = %path.display(),
                    from_file = n,
                    accepted = total,
                    "api tokens reloaded"
                );
                Ok(total)
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    kept = self.count(),
                    "api token reload failed; the tokens in force are kept"
                );
                Err(e)
            }
        }
    }

    fn current(&self) -> Arc<[Box<[u8]>]> {
        self.from_file
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// One token a line; blank lines and `#` comments are skipped, surrounding
/// whitespace trimmed. A token with inner whitespace cannot be sent in an
/// `Authorization: Bearer` header as such, so it is refused rather than
/// silently never matching. Errors name the file and line, never the token.
fn read(path: &Path) -> Result<Vec<Box<[u8]>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read api_token_file {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.chars().any(char::is_whitespace) {
            return Err(format!(
                "api_token_file {} line {}: a token may not contain whitespace",
                path.display(),
                i + 1
            ));
        }
        out.push(t.as_bytes().into());
    }
    if out.is_empty() {
        return Err(format!("api_token_file {} holds no token", path.display()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Tokens;
    use std::io::Write;

    #[test]
    fn file_tokens_and_the_fixed_one_are_all_accepted_and_reload_keeps_the_last_good_list() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "# the old one\n  old-token  \n\n").unwrap();
        let t = Tokens::load(Some("fixed"), Some(f.path())).unwrap();
        assert_eq!(t.count(), 2);
        assert!(t.accepts(b"old-token") && t.accepts(b"fixed"));
        assert!(!t.accepts(b"old-toke") && !t.accepts(b"") && !t.accepts(b"# the old one"));
        std::fs::write(f.path(), "new-token\n").unwrap();
        assert_eq!(t.reload(), Ok(2));
        assert!(!t.accepts(b"old-token") && t.accepts(b"new-token"));
        std::fs::write(f.path(), "two words\n").unwrap();
        assert!(t.reload().is_err());
        std::fs::write(f.path(), "# nothing\n").unwrap();
        assert!(t.reload().is_err());
        std::fs::remove_file(f.path()).unwrap();
        assert!(t.reload().is_err());
        assert!(t.accepts(b"new-token"), "a failed reload keeps the list");
    }

    #[test]
    fn no_token_at_all_requires_none_and_an_empty_file_is_refused_at_start() {
        let t = Tokens::load(None, None).unwrap();
        assert!(!t.required());
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(Tokens::load(None, Some(f.path())).is_err());
    }
}
