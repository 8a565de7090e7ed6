//! `eden-writer`: the application of the node's tests, run inside an application pod whose
//! injected sidecar listens on `127.0.0.1:6379`. `eden-writer NAME [HOST:PORT]` writes and reads
//! through it (or through a gateway at `HOST:PORT`) as [`eden_e2e::writers`] describes until it
//! receives SIGTERM, then prints `acknowledged` and what its clients were told as JSON on one
//! line, and waits for the pod to go. `eden-writer stop`, run in the same container (`kubectl
//! exec`), sends that SIGTERM to the writer, which is the container's first process.
//!
//! Its clients reconnect when the proxy drops them (a killed sidecar container that the
//! kubelet restarts); the test tells which writers may count reconnects.

use std::process::ExitCode;

use eden_e2e::writers::{Client, write_and_read_until};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let name = match std::env::args().nth(1) {
        Some(command) if command == "stop" => {
            // SAFETY: kill(2) takes plain integers; PID 1 is this container's writer.
            return match unsafe { libc::kill(1, libc::SIGTERM) } {
                0 => ExitCode::SUCCESS,
                _ => {
                    eprintln!("eden-writer: signalling the writer failed: {}", std::io::Error::last_os_error());
                    ExitCode::FAILURE
                }
            };
        }
        Some(name) => name,
        None => {
            eprintln!("usage: eden-writer NAME [HOST:PORT] | eden-writer stop");
            return ExitCode::from(2);
        }
    };
    let mut terminate = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let address = std::env::args().nth(2).unwrap_or_else(|| "127.0.0.1:6379".into());
    let client = Client { address, drops: true };
    let writer = tokio::spawn(async move { write_and_read_until(client, &name, stopped).await });
    terminate.recv().await;
    stop.send_replace(true);
    let acknowledged = writer.await.expect("the writer does not panic");
    println!("acknowledged {}", serde_json::to_string(&acknowledged).expect("plain data serializes"));
    // The pod's own termination ends it.
    terminate.recv().await;
    ExitCode::SUCCESS
}
