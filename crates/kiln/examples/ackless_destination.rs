//! A migration destination that takes a whole migration, then hangs up
//! instead of answering `Ack`: the one failure after which the source
//! cannot know whether the guest runs at the destination (tests/migrate.rs
//! checks that the source then keeps its guest paused).
//!
//! ```text
//! ackless_destination SOCKET
//! ```
//!
//! It listens on the Unix socket SOCKET, prints "waiting for a migration",
//! plays the destination's part of the protocol up to `Done` and exits.

use std::os::unix::net::UnixListener;
use std::process::ExitCode;

use kiln_snapshot::migration::{self as wire, Message};

fn main() -> ExitCode {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: ackless_destination SOCKET");
        return ExitCode::from(2);
    };
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ackless_destination: {path}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("waiting for a migration on {path}");
    let mut s = match listener.accept() {
        Ok((s, _)) => s,
        Err(e) => {
            eprintln!("ackless_destination: accept: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut pages = 0u64;
    loop {
        match wire::recv(&mut s) {
            Ok(Message::Layout(_)) => {
                if let Err(e) = wire::send(&mut s, &wire::hello()) {
                    eprintln!("ackless_destination: {e}");
                    return ExitCode::FAILURE;
                }
            }
            Ok(Message::Pages { data, .. }) => pages += data.len() as u64 / 4096,
            Ok(Message::Done) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("ackless_destination: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("ackless_destination: took {pages} pages and Done; hanging up without Ack");
    let _ = std::fs::remove_file(&path);
    ExitCode::SUCCESS
}
