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
    Serve(qwen_edit::config::ServeArgs),
    /// Edit images from the command line.
    Edit,
    /// Compile a bundle's ONNX graphs into TensorRT engines.
    Build(qwen_edit::builder::BuildArgs),
    /// Print the inputs and outputs of an ONNX graph or TensorRT engine.
    Inspect(qwen_edit::builder::InspectArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = match cli.command {
        Command::Serve(args) => return ExitCode::from(qwen_edit::server::main_serve(&args)),
        Command::Edit => "edit",
        Command::Build(args) => return ExitCode::from(qwen_edit::builder::main_build(&args)),
        Command::Inspect(args) => return ExitCode::from(qwen_edit::builder::main_inspect(&args)),
    };
    eprintln!("qwen-edit {name}: not implemented yet");
    ExitCode::from(2)
}
