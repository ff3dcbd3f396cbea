//! Runs one shell command in the lab with the console streamed live.
//!
//! `cargo run -p kiln-lab --example lab_run -- 'cat /proc/uptime'`

use kiln_lab::{images, Lab};

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(125);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = if args.is_empty() {
        "uname -a".to_string()
    } else {
        args.join(" ")
    };
    let imgs = images::ensure(&images::default_cache_dir())?;
    let status = Lab::new(imgs).run_interactive(&cmd)?;
    eprintln!("lab command exited with status {status}");
    std::process::exit(status);
}
