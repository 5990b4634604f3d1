//! Man pages and shell completions, generated from a program's own clap definition, so they
//! cannot drift from the options the program takes. Every pwsync program has
//! `completions bash|zsh|fish` (printed on stdout, for users and packages) and a hidden
//! `manpages DIR` (one page per command and subcommand: `pwsync-agent.1`,
//! `pwsync-agent-submit.1`, …) that `scripts/build-debs.sh` runs.

pub use clap_complete::Shell;
use std::path::Path;

/// The two documentation commands every program has (flattened into its own subcommands).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DocsCommand {
    /// Print the completion script for SHELL (bash, zsh, fish) on stdout.
    Completions { shell: Shell },
    /// Write the man pages (one per command) into DIR.
    #[command(hide = true)]
    Manpages { dir: std::path::PathBuf },
}

impl DocsCommand {
    /// Does it for `cmd`, the program's whole command line.
    pub fn run(self, cmd: clap::Command) -> std::io::Result<()> {
        match self {
            DocsCommand::Completions { shell } => {
                print_completions(cmd, shell);
                Ok(())
            }
            DocsCommand::Manpages { dir } => write_manpages(cmd, &dir).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("writing the man pages into {}: {e}", dir.display()),
                )
            }),
        }
    }
}

/// Prints `shell`'s completion script for `cmd` on stdout.
pub fn print_completions(mut cmd: clap::Command, shell: Shell) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, &mut std::io::stdout());
}

/// Writes `NAME.1` for `cmd` and `NAME-SUB.1` for each visible subcommand (recursively) into
/// `dir`.
pub fn write_manpages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = cmd;
    cmd.build();
    write_page(&cmd, cmd.get_name(), dir)
}

fn write_page(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    let page = cmd.clone().name(name.to_string());
    let mut out = Vec::new();
    clap_mangen::Man::new(page).render(&mut out)?;
    std::fs::write(dir.join(format!("{name}.1")), out)?;
    // clap's own `help` subcommand gets no page: `NAME --help` and the pages say it all.
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        write_page(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_command_and_subcommand() {
        let cmd = clap::Command::new("prog")
            .version("1")
            .about("does things")
            .subcommand(clap::Command::new("run").about("runs"))
            .subcommand(clap::Command::new("secret").hide(true));
        let dir = tempfile::tempdir().unwrap();
        write_manpages(cmd, dir.path()).unwrap();
        let page = std::fs::read_to_string(dir.path().join("prog.1")).unwrap();
        assert!(page.contains("does things"), "{page}");
        assert!(dir.path().join("prog-run.1").exists());
        assert!(!dir.path().join("prog-secret.1").exists());
    }
}
