//! `devtenant`: plays Atlassian against a Connect app on this machine. See
//! `devtenant --help` and [`connect_warden::devtenant::cli`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    connect_warden::devtenant::cli::main().await
}
