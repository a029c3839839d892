//! The `qwen-edit` command line: serve | worker | edit | build | inspect.
//! Each subcommand parses its flags here and hands off to the library.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "qwen-edit", version, about = "Qwen-Image-Edit inference server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the RunPod-style HTTP API.
    Serve(qwen_edit::config::ServeArgs),
    /// Run as a RunPod serverless worker (or run one job locally with --test-input / ./test_input.json).
    Worker(qwen_edit::config::WorkerArgs),
    /// Edit images from the command line.
    Edit(qwen_edit::editor::EditArgs),
    /// Compile a bundle's ONNX graphs into TensorRT engines.
    Build(qwen_edit::builder::BuildArgs),
    /// Print the inputs and outputs of an ONNX graph or TensorRT engine.
    Inspect(qwen_edit::builder::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` and `worker` set up their own logging; the one-shot commands log only when RUST_LOG asks them to.
    if !matches!(cli.command, Command::Serve(_) | Command::Worker(_)) && std::env::var_os("RUST_LOG").is_some() {
        qwen_edit::lifecycle::init_logging(qwen_edit::config::LogFormat::Text);
    }
    ExitCode::from(match cli.command {
        Command::Serve(args) => qwen_edit::server::main_serve(&args),
        Command::Worker(args) => qwen_edit::worker::main_worker(&args),
        Command::Edit(args) => qwen_edit::editor::main_edit(&args),
        Command::Build(args) => qwen_edit::builder::main_build(&args),
        Command::Inspect(args) => qwen_edit::builder::main_inspect(&args),
    })
}
