#[tokio::main]
async fn main() -> anyhow::Result<()> {
    connect_warden::cli::main().await
}
