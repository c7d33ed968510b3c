//! `edgenode-docs DIR`: writes the shell completions (`DIR/completions/`) and
//! the man page (`DIR/man/edgenode.1`) generated from the server's flags.
//! Run at release time by `scripts/release.sh`; not a server and not shipped.
//! Built only with the `docs` feature, so the generators never reach the
//! server binary (see `src/docs.rs` for why).

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: edgenode-docs DIR   (writes DIR/completions/* and DIR/man/edgenode.1)");
        return ExitCode::from(2);
    };
    match edgenode::docs::write_all(std::path::Path::new(&dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgenode-docs: {e}");
            ExitCode::FAILURE
        }
    }
}
