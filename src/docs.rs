//! Shell completions and the man page, generated from the one declaration of
//! the flags ([`crate::config::Args`]) by clap_complete and clap_mangen.
//!
//! `edgenode completions <bash|zsh|fish>` prints the script from the server
//! binary itself (clap_complete: 131 072 bytes of the aarch64 release,
//! 3 818 080 -> 3 949 152, under the 4 000 000 budget). The man page's roff
//! writer (clap_mangen) would take as much again and both together do not
//! fit (4 014 688 bytes, measured), so the man page is made by a separate
//! binary, `edgenode-docs` (cargo feature `docs`, never shipped as a
//! server), which `scripts/release.sh` runs to put `man/edgenode.1` and the
//! completion files into every tarball; `edgenode man` says where it is.

use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

/// What `edgenode completions …` or `edgenode man` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    Completions,
    Man,
}

/// The shells completions are made for, with each script's file name in a
/// release tarball (`completions/…`) and where the shell looks for it.
pub const SHELLS: [(&str, &str, &str); 3] = [
    (
        "bash",
        "edgenode.bash",
        "/usr/share/bash-completion/completions/edgenode",
    ),
    (
        "zsh",
        "_edgenode",
        "/usr/local/share/zsh/site-functions/_edgenode",
    ),
    (
        "fish",
        "edgenode.fish",
        "/usr/share/fish/vendor_completions.d/edgenode.fish",
    ),
];

/// `argv[1]` is `completions` or `man`.
pub fn requested(mut args: impl Iterator<Item = OsString>) -> Option<Asked> {
    match args.nth(1)?.to_str()? {
        "completions" => Some(Asked::Completions),
        "man" => Some(Asked::Man),
        _ => None,
    }
}

/// `edgenode completions <shell>`: the script on stdout (exit 0); no shell
/// or another one: what to type, on stderr (exit 2).
pub fn print_completions(mut args: impl Iterator<Item = OsString>) -> ExitCode {
    let asked = args.nth(2).and_then(|a| a.into_string().ok());
    let shell = asked.as_deref().and_then(|name| {
        SHELLS
            .iter()
            .any(|(s, _, _)| *s == name)
            .then(|| name.parse::<clap_complete::Shell>().ok())
            .flatten()
    });
    let Some(shell) = shell else {
        let list: Vec<String> = SHELLS
            .iter()
            .map(|(shell, _, installed)| format!("  edgenode completions {shell} > {installed}"))
            .collect();
        eprintln!(
            "edgenode: completions for which shell{}? One of:\n{}",
            asked
                .map(|a| format!(" ({a:?} is not one)"))
                .unwrap_or_default(),
            list.join("\n")
        );
        return ExitCode::from(2);
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "edgenode", &mut out);
    match std::io::stdout().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgenode: writing the completions: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `edgenode man`: where the man page is (exit status 1: nothing was
/// printed on stdout, so `edgenode man > file` never writes a message into
/// a man page).
pub fn point_to_man_page() -> ExitCode {
    eprintln!(
        "edgenode: the man page is not built into the server binary (binary size \
         budget); every release tarball carries it as man/edgenode.1 (copy it to \
         /usr/local/share/man/man1/edgenode.1, or read it with `man ./man/edgenode.1`).\n\
         From a source tree: cargo run --features docs --bin edgenode-docs -- DIR \
         writes it (and the completion files) into DIR."
    );
    ExitCode::FAILURE
}

/// The command the files describe: the server's flags and `--help` text.
fn command() -> clap::Command {
    use clap::CommandFactory;
    // The environment of whoever generates the files must not end up in
    // them (`[env: EDGENODE_LISTEN=…]`).
    // The version alone: the build line names the host that generated the
    // files, not the target of the tarball they ship in.
    crate::healthcheck::documented(crate::config::Args::command())
        .version(env!("CARGO_PKG_VERSION"))
        .mut_args(|a| a.hide_env_values(true))
}

/// Writes `completions/<file>` for every shell of [`SHELLS`] and
/// `man/edgenode.1` under `dir`.
#[cfg(feature = "docs")]
pub fn write_all(dir: &std::path::Path) -> std::io::Result<()> {
    use clap_complete::Shell;
    let completions = dir.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (name, file, _) in SHELLS {
        let shell: Shell = name
            .parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut command(), "edgenode", &mut out);
        std::fs::write(completions.join(file), out)?;
    }
    let man = dir.join("man");
    std::fs::create_dir_all(&man)?;
    let mut out = Vec::new();
    clap_mangen::Man::new(command()).render(&mut out)?;
    std::fs::write(man.join("edgenode.1"), out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_words_are_taken() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>().into_iter();
        assert_eq!(
            requested(args(&["edgenode", "completions", "bash"])),
            Some(Asked::Completions)
        );
        assert_eq!(requested(args(&["edgenode", "man"])), Some(Asked::Man));
        assert_eq!(requested(args(&["edgenode", "--listen", "man"])), None);
        assert_eq!(requested(args(&["edgenode"])), None);
    }
}
