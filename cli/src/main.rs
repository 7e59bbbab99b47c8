use clap::Parser;

fn main() {
    let cli = kubectl_agentrun::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kubectl-agentrun: cannot start the async runtime: {e}");
            std::process::exit(kubectl_agentrun::EXIT_ERROR);
        }
    };
    let code = match runtime.block_on(kubectl_agentrun::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kubectl-agentrun: {e:#}");
            kubectl_agentrun::EXIT_ERROR
        }
    };
    std::process::exit(code);
}
