//! `kubectl eden`: the verbs of a migration, as patches of its Migration (see
//! `eden_operator::plugin`). On PATH as `kubectl-eden`, kubectl runs it as `kubectl eden`.
//!
//! With Argo CD or Flux owning the Migration, change its manifest in Git instead: they would put
//! back the spec this patches.

use clap::{Parser, Subcommand};
use eden_operator::crd::Migration;
use eden_operator::plugin::{self, Verb};
use kube::Api;
use kube::api::{Patch, PatchParams};

#[derive(Parser, Debug)]
#[command(name = "kubectl eden", version, about = "Move an Eden Migration along: cutover, rollback, complete, pause")]
struct Args {
    /// The Migration's namespace (the kubeconfig context's when absent).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the target authoritative: writes go to it, mirrored back to the source.
    Cutover { migration: String },
    /// Make the source authoritative again, with every read; lossless while the sidecars have
    /// mirrored every write back.
    Rollback {
        migration: String,
        /// Roll back even though this many writes mirrored to the source never landed there (the
        /// count the Migration's RollbackNotLossless condition gives, or more).
        #[arg(long)]
        accept_lost_writes: Option<u64>,
    },
    /// Detach the source once cut over: the point of no return.
    Complete { migration: String },
    /// Hold the Migration where it is.
    Pause { migration: String },
    /// Let a paused Migration go on.
    Resume { migration: String },
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(err) = run(args).await {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (name, verb) = match args.command {
        Command::Cutover { migration } => (migration, Verb::Cutover),
        Command::Rollback { migration, accept_lost_writes } => (migration, Verb::Rollback { accept_lost_writes }),
        Command::Complete { migration } => (migration, Verb::Complete),
        Command::Pause { migration } => (migration, Verb::Pause),
        Command::Resume { migration } => (migration, Verb::Resume),
    };
    let client = kube::Client::try_default().await.map_err(|e| format!("no Kubernetes API: {e}"))?;
    let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let migrations: Api<Migration> = Api::namespaced(client, &namespace);
    let migration =
        migrations.get_opt(&name).await?.ok_or_else(|| format!("no Migration {name} in namespace {namespace}"))?;
    let patch = plugin::patch(&migration, &verb)?;
    migrations.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    println!("migration.eden.io/{name} patched: {patch}");
    println!("follow it with: kubectl get migration {name} -n {namespace} -w");
    Ok(())
}
