//! Shell completions and the man page, generated from the one declaration of
//! the flags ([`crate::config::Args`]) by clap_complete and clap_mangen.
//!
//! Why not inside the server binary: the aarch64 release has a 4 000 000-byte
//! budget, and the generators do not fit it with room to spare. Measured on
//! the stripped aarch64 musl release (`cargo build --release --target
//! aarch64-unknown-linux-musl`, opt-level "z", fat LTO), the same commit built
//! three more ways:
//!
//! | in the server binary                          | bytes     | under budget |
//! |-----------------------------------------------|-----------|--------------|
//! | neither (this design)                         | 3 818 080 | 181 920      |
//! | clap_complete, bash + zsh + fish only         | 3 949 152 |  50 848      |
//! | clap_mangen (roff) only                       | 3 949 152 |  50 848      |
//! | both                                          | 4 014 688 | over: 14 688 |
//!
//! (Code and data grow by ~72 KB for the three shells and ~84 KB for the man
//! page, `size`; the file grows by 128 KiB either way because its segments
//! are 64 KiB aligned.) Either generator alone would leave less than the
//! ~60 KB a release keeps free for the next feature, so they are built into a
//! separate binary, `edgenode-docs` (cargo feature `docs`, never shipped as a
//! server), which `scripts/release.sh` runs to put `completions/` and
//! `man/edgenode.1` into every tarball. `edgenode completions <shell>` and
//! `edgenode man` in the server binary say where those files are.

use std::ffi::OsString;
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

/// Tells where the generated files are (exit status 1: nothing was
/// printed on stdout, so `edgenode completions bash > file` never writes a
/// message into a completion script).
pub fn point_to_files(asked: Asked) -> ExitCode {
    let what = match asked {
        Asked::Completions => {
            let list: Vec<String> = SHELLS
                .iter()
                .map(|(shell, file, installed)| {
                    format!("  {shell}: completions/{file} (copy it to {installed})")
                })
                .collect();
            format!(
                "shell completions are not built into the server binary (binary size \
                 budget); every release tarball carries them:\n{}",
                list.join("\n")
            )
        }
        Asked::Man => "the man page is not built into the server binary (binary size \
                       budget); every release tarball carries it as man/edgenode.1 \
                       (copy it to /usr/local/share/man/man1/edgenode.1, or read it \
                       with `man ./man/edgenode.1`)"
            .to_string(),
    };
    eprintln!(
        "edgenode: {what}\nFrom a source tree: cargo run --features docs --bin edgenode-docs -- DIR \
         writes them all into DIR."
    );
    ExitCode::FAILURE
}

/// The command the files describe: the server's flags and `--help` text.
#[cfg(feature = "docs")]
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
