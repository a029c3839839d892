//! The `qwen-edit` command line: serve | edit | build | inspect.
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
    Serve,
    /// Edit images from the command line.
    Edit,
    /// Compile a bundle's ONNX graphs into TensorRT engines.
    Build,
    /// Print the inputs and outputs of an ONNX graph or TensorRT engine.
    Inspect,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Serve => "serve",
        Command::Edit => "edit",
        Command::Build => "build",
        Command::Inspect => "inspect",
    };
    eprintln!("qwen-edit {name}: not implemented yet");
    ExitCode::from(2)
}
