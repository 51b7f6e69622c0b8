//! The `ferry` binary: parses the command line and hands over to [`ferry::cli`].

fn main() -> std::process::ExitCode {
    ferry::cli::main()
}
