//! `devtenant`: plays Atlassian against a Connect app on this machine. See
//! `devtenant --help` and [`devtenant::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    devtenant::cli::main().await
}
