//! `kubectl eden`: where migrations stand (`status`, `list`) and the verbs that move one, as
//! patches of its Migration (see `eden_operator::plugin`). On PATH as `kubectl-eden`, kubectl
//! runs it as `kubectl eden`.
//!
//! With Argo CD or Flux owning the Migration, change its manifest in Git instead: they would put
//! back the spec the verbs patch.

use std::io::IsTerminal;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use eden_operator::crd::Migration;
use eden_operator::plugin::status::{Report, table};
use eden_operator::plugin::{self, Verb};
use eden_sidecar::lease::LABEL_MIGRATION;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};

#[derive(Parser, Debug)]
#[command(
    name = "kubectl eden",
    version,
    about = "See Eden Migrations and move them along: status, cutover, rollback, complete"
)]
struct Args {
    /// The Migration's namespace (the kubeconfig context's when absent).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Where a Migration stands: phase and path, copy progress, lag, verification, sidecars,
    /// what holds it and what to do next.
    Status {
        migration: String,
        /// Keep showing it, refreshed every second.
        #[arg(short, long)]
        watch: bool,
        #[arg(short, long)]
        output: Option<Output>,
        /// Render as of this time (RFC 3339) instead of now: reproducible output.
        #[arg(long, hide = true)]
        now: Option<Timestamp>,
    },
    /// Every Migration of the namespace, one line each.
    List {
        /// Of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        #[arg(short, long)]
        output: Option<Output>,
        #[arg(long, hide = true)]
        now: Option<Timestamp>,
    },
    /// Send this share of reads (0–100) to the target.
    SetRead { migration: String, percentage: u8 },
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

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Output {
    Json,
    Yaml,
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
    let client = Client::try_default().await.map_err(|e| format!("no Kubernetes API: {e}"))?;
    let namespace = args.namespace.unwrap_or_else(|| client.default_namespace().to_string());
    let (name, verb) = match args.command {
        Command::Status { migration, watch, output, now } => {
            return status(&client, &namespace, &migration, watch, output, now).await;
        }
        Command::List { all_namespaces, output, now } => {
            let namespace = (!all_namespaces).then_some(namespace.as_str());
            return list(&client, namespace, output, now).await;
        }
        Command::SetRead { migration, percentage } => (migration, Verb::SetRead { percentage }),
        Command::Cutover { migration } => (migration, Verb::Cutover),
        Command::Rollback { migration, accept_lost_writes } => (migration, Verb::Rollback { accept_lost_writes }),
        Command::Complete { migration } => (migration, Verb::Complete),
        Command::Pause { migration } => (migration, Verb::Pause),
        Command::Resume { migration } => (migration, Verb::Resume),
    };
    let migrations: Api<Migration> = Api::namespaced(client, &namespace);
    let migration =
        migrations.get_opt(&name).await?.ok_or_else(|| format!("no Migration {name} in namespace {namespace}"))?;
    let patch = plugin::patch(&migration, &verb)?;
    migrations.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    println!("migration.eden.io/{name} patched: {patch}");
    println!("follow it with: kubectl eden status {name} -n {namespace} --watch");
    Ok(())
}

/// The Migrations of `namespace` (every namespace when `None`) with their Events and their
/// sidecars' Leases, as reports.
async fn reports(
    client: &Client,
    namespace: Option<&str>,
    name: Option<&str>,
    now: Timestamp,
) -> Result<Vec<Report>, Box<dyn std::error::Error>> {
    fn api<K: kube::Resource<Scope = kube::core::NamespaceResourceScope>>(
        client: &Client,
        namespace: Option<&str>,
    ) -> Api<K>
    where
        K::DynamicType: Default,
    {
        match namespace {
            Some(namespace) => Api::namespaced(client.clone(), namespace),
            None => Api::all(client.clone()),
        }
    }
    let migrations: Vec<Migration> = match (name, namespace) {
        (Some(name), Some(namespace)) => vec![
            api::<Migration>(client, Some(namespace))
                .get_opt(name)
                .await?
                .ok_or_else(|| format!("no Migration {name} in namespace {namespace}"))?,
        ],
        _ => api::<Migration>(client, namespace).list(&ListParams::default()).await?.items,
    };
    let (events, leases) = (api::<Event>(client, namespace), api::<Lease>(client, namespace));
    let (every, sidecars) = (ListParams::default(), ListParams::default().labels(LABEL_MIGRATION));
    let (events, leases) = tokio::try_join!(events.list(&every), leases.list(&sidecars))?;
    Ok(migrations
        .iter()
        .map(|migration| {
            // Report::new reads only the objects about this Migration: its Events by UID, its
            // Leases by label; namespaces keep same-named Migrations apart.
            let leases: Vec<Lease> =
                leases.items.iter().filter(|l| l.namespace() == migration.namespace()).cloned().collect();
            Report::new(migration, &events.items, &leases, now)
        })
        .collect())
}

async fn status(
    client: &Client,
    namespace: &str,
    name: &str,
    watch: bool,
    output: Option<Output>,
    now: Option<Timestamp>,
) -> Result<(), Box<dyn std::error::Error>> {
    let terminal = std::io::stdout().is_terminal();
    let colour = terminal && std::env::var_os("NO_COLOR").is_none();
    let mut shown = String::new();
    loop {
        let at = now.unwrap_or_else(Timestamp::now);
        let report = reports(client, Some(namespace), Some(name), at).await?.remove(0);
        let text = match output {
            Some(output) => print(&report, output)?,
            None => report.render(at, colour),
        };
        if !watch {
            print!("{text}");
            return Ok(());
        }
        if terminal {
            // Redrawn in place every second: ages and rates move even when nothing else does.
            print!("\x1b[2J\x1b[H{text}");
        } else if text != shown {
            println!("{text}");
        }
        shown = text;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn list(
    client: &Client,
    namespace: Option<&str>,
    output: Option<Output>,
    now: Option<Timestamp>,
) -> Result<(), Box<dyn std::error::Error>> {
    let now = now.unwrap_or_else(Timestamp::now);
    let reports = reports(client, namespace, None, now).await?;
    match output {
        Some(output) => print!("{}", print(&reports, output)?),
        None if reports.is_empty() => eprintln!("no Migrations found"),
        None => {
            let rows: Vec<[String; 8]> = reports.iter().map(|report| report.row(now)).collect();
            print!("{}", table(&rows, namespace.is_none()));
        }
    }
    Ok(())
}

fn print(value: &impl serde::Serialize, output: Output) -> Result<String, Box<dyn std::error::Error>> {
    Ok(match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        Output::Yaml => serde_yaml::to_string(value)?,
    })
}
