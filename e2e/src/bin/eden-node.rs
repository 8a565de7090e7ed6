//! `eden-node`: a real single-node Kubernetes on this machine (`eden_e2e::Node`), for the tests
//! that run Pods and for watching Eden in real ones. Needs root.
//!
//! `eden-node` brings the node up (waiting for any other node on this machine to go first),
//! prints `ready <kubeconfig> <containerd socket>`, serves until its standard input closes, then
//! tears it down. `eden-node down` removes what a run that was killed left behind.

use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = eden_e2e::node::default_dir();
    let result = match std::env::args().nth(1).as_deref() {
        None => eden_e2e::node::serve(&dir),
        Some("down") => {
            eden_e2e::node::teardown(&dir, None);
            Ok(())
        }
        Some(other) => {
            eprintln!("eden-node: unknown command {other:?}; usage: eden-node [down]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("eden-node: {err}");
            ExitCode::FAILURE
        }
    }
}
