//! `kiln api`: the command-line client of a VM's API socket.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Options of `kiln api`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The API socket of a running `kiln run --api-sock`.
    #[arg(long)]
    sock: PathBuf,
    /// GET, PUT, PATCH, ...
    method: String,
    /// E.g. /balloon.
    uri: String,
    /// JSON body.
    json: Option<String>,
}

/// `kiln api`: prints the status line and body; 0 on 2xx, else 1.
pub fn api(args: ApiArgs) -> Result<i32> {
    let r = kiln_api::client::request(&args.sock, &args.method, &args.uri, args.json.as_deref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.sock.display()))?;
    println!("{}", r.status_line);
    if !r.body.is_empty() {
        println!("{}", r.body);
    }
    Ok(if (200..300).contains(&r.status) { 0 } else { 1 })
}
